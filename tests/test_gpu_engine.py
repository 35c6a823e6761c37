"""The CUDA path's branches, run on the CPU through explicit Runtime settings (issue 11)."""

from __future__ import annotations

import dataclasses
import math
import os
import weakref

import pytest
import torch
from torch import nn

import catdog_hpo.engine.train as train_module
from catdog_hpo.config import AugmentConfig, BlockConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig
from catdog_hpo.data import ImageSet
from catdog_hpo.engine.graphstep import ForeachSGD
from catdog_hpo.engine.runtime import Runtime, for_device
from catdog_hpo.engine.epochs import EpochStats
from catdog_hpo.engine.train import fit

CPU = torch.device("cpu")
SIZE = 16


def tiny_set(n_train: int = 128, n_val: int = 40, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randint(0, 160, (n, 3, SIZE, SIZE), generator=g)
        x[torch.arange(n), y] += 80  # class = the brighter of channels 0 and 1
        return x.to(torch.uint8), y

    tx, ty = make(n_train)
    vx, vy = make(n_val)
    return ImageSet(tx, ty, vx, vy, ("a", "b"), fingerprint=f"tiny-{seed}")


def cfg_with(optim: str = "adam", scheduler: str = "cosine", epochs: int = 2, **train: object) -> TrialConfig:
    model = ModelConfig(blocks=(BlockConfig(8), BlockConfig(16)), head="gap", dropout=0.0)
    return TrialConfig(image_size=SIZE, model=model, augment=AugmentConfig(crop="pad"),
                       optim=OptimConfig(name=optim, lr=3e-3, scheduler=scheduler, momentum=0.9),
                       train=TrainConfig(**{"epochs": epochs, "batch_size": 32, **train}))


@pytest.fixture(scope="module")
def data() -> ImageSet:
    return tiny_set()


def test_cuda_defaults_and_cpu_defaults() -> None:
    cuda = for_device(torch.device("cuda"), TrainConfig())
    assert cuda.autocast == torch.bfloat16 and cuda.channels_last and cuda.fused and cuda.cuda_graph
    assert not cuda.cudnn_benchmark  # off by default: short trials re-tune each new shape
    assert for_device(torch.device("cuda"), TrainConfig(amp=False)).autocast is None
    compiled = for_device(torch.device("cuda"), TrainConfig(compile=True))
    assert compiled.compile_backend == "inductor" and not compiled.cuda_graph


def test_cpu_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU: channels_last always; bf16 autocast only where the CPU has it in hardware
    (emulated bf16 is slower than fp32) and train.amp is on; nothing of the CUDA-only path."""
    from catdog_hpo.engine import runtime

    for native in (True, False):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda native=native: native)
        cpu = for_device(CPU, TrainConfig())
        assert cpu == Runtime(autocast=torch.bfloat16 if native else None, channels_last=True)
        assert for_device(CPU, TrainConfig(amp=False)) == Runtime(channels_last=True)
    assert isinstance(runtime.cpu_has_native_bf16(), bool)


def test_cpu_default_runtime_trains_and_replays(data: ImageSet) -> None:
    """The CPU's default path (channels_last, bf16 where native) completes, and the same config and
    seed give the same history: a trial's value and retrain's replay agree."""
    cfg = cfg_with("adam", epochs=2)
    a, b = fit(cfg, data, CPU), fit(cfg, data, CPU)
    assert a.status == "completed" and [s.val_acc for s in a.history] == [s.val_acc for s in b.history]
    assert [s.train_loss for s in a.history] == [s.train_loss for s in b.history]


@pytest.mark.parametrize("optim", ["adam", "adamw", "sgd"])
def test_static_step_matches_the_eager_loop(data: ImageSet, optim: str) -> None:
    """The graph path's step (static buffers, device lr, shadow schedule), uncaptured on the CPU,
    trains as the eager loop does (the same draws; float rounding may differ)."""
    cfg = cfg_with(optim, scheduler="onecycle")
    eager = fit(cfg, data, CPU, runtime=Runtime())
    static = fit(cfg, data, CPU, runtime=Runtime(static_step=True))
    assert [s.lr for s in static.history] == [s.lr for s in eager.history]  # the schedule, exactly
    for a, b in zip(eager.history, static.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-3)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-3)


@pytest.mark.parametrize("name", ["fp32", "bf16_channels_last_fused_static"])
def test_cuda_settings_run_through_fit_on_the_cpu(data: ImageSet, name: str) -> None:
    rt = Runtime() if name == "fp32" else Runtime(autocast=torch.bfloat16, channels_last=True, fused=True,
                                                  static_step=True, aug_chunk_values=3 * SIZE * SIZE * 64)
    result = fit(cfg_with(epochs=2), data, CPU, runtime=rt)
    assert result.status == "completed" and len(result.history) == 2
    assert all(math.isfinite(s.train_loss) and math.isfinite(s.val_loss) for s in result.history)
    assert result.best_state is not None
    assert all(v.dtype != torch.bfloat16 for v in result.best_state.values())  # weights stay fp32


def test_validation_is_fp32_and_counts_every_image_once(data: ImageSet) -> None:
    """Val runs without autocast (fp32 logits) in padded fixed-shape batches; the padding
    (label -100) changes neither the loss nor the accuracy."""
    cfg = cfg_with(epochs=1)
    model = train_module.build_model(cfg.model, 2, SIZE)
    rt = Runtime(autocast=torch.bfloat16)
    loop = train_module._make_loop(cfg, data, CPU, model, rt)
    loop.val_batch = 16  # 40 images -> 3 batches, the last padded
    loop.val_n, loop.val_y, _ = train_module._validation(dataclasses.replace(data), CPU, rt)
    seen: list[torch.dtype] = []
    hook = model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss, acc = loop.evaluate()
    hook.remove()
    assert seen and set(seen) == {torch.float32}
    model.eval()
    with torch.no_grad():
        logits = model(train_module.normalize_batch(data.val_x))
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(logits, data.val_y).item(), rel=1e-5)
    assert acc.item() == pytest.approx((logits.argmax(1) == data.val_y).float().mean().item())


def test_padded_validation_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    import catdog_hpo.engine.runtime as runtime_module

    d = tiny_set(n_val=7)
    xn, y, batch = train_module._validation(d, CPU, Runtime())
    assert batch == 7 and xn.shape[0] == 7 and (y >= 0).all()
    monkeypatch.setattr(runtime_module, "VAL_CHUNK_VALUES", 3 * SIZE * SIZE * 3)  # 3 images per batch
    xn, y, batch = train_module._validation(d, CPU, Runtime(channels_last=True))
    assert batch == 3 and xn.shape[0] == 9 and (y[7:] == -100).all() and (xn[7:] == 0).all()
    assert xn.is_contiguous(memory_format=torch.channels_last)


def test_foreach_sgd_is_torch_sgd() -> None:
    torch.manual_seed(0)
    for nesterov, wd in ((False, 0.0), (True, 1e-2)):
        a = nn.Linear(5, 3)
        b = nn.Linear(5, 3)
        b.load_state_dict(a.state_dict())
        o = OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd)
        ref = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd)
        lr = torch.tensor(0.1)
        mine = ForeachSGD(list(b.parameters()), o, lr)
        for step in range(4):
            x = torch.randn(8, 5)
            for m, opt in ((a, ref), (b, mine)):
                opt.zero_grad(set_to_none=True)
                m(x).pow(2).mean().backward()
                opt.step()
            if step == 1:  # the lr tensor is what the step reads
                lr.fill_(0.05)
                ref.param_groups[0]["lr"] = 0.05
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _SyncCounter:
    """Counts Tensor -> Python reads (on CUDA each is a device->host sync)."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):  # type: ignore[no-untyped-def]
        def counted(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
            self.count += 1
            return original(tensor, *args, **kwargs)

        return counted


@pytest.mark.parametrize("static", [False, True])
def test_one_sync_per_epoch(data: ImageSet, monkeypatch: pytest.MonkeyPatch, static: bool) -> None:
    """0 reads per step, 1 per epoch (where the losses and accuracy are read together)."""
    cfg = cfg_with("adamw", scheduler="onecycle", epochs=3, grad_clip=1.0)
    rt = Runtime(fused=True, static_step=static, aug_chunk_values=3 * SIZE * SIZE * 32)  # a chunk per batch
    per_epoch: list[int] = []
    counter: _SyncCounter | None = None

    def on_epoch_end(stats: EpochStats) -> None:
        per_epoch.append(counter.count)

    monkeypatch.setattr(train_module, "_cpu_copy", lambda model: {})  # the best-epoch copy is not a sync of the loop
    counter = _SyncCounter(monkeypatch)
    fit(cfg, data, CPU, on_epoch_end=on_epoch_end, runtime=rt)
    steps = data.train_x.shape[0] // cfg.train.batch_size
    assert steps == 4 and per_epoch == [1, 2, 3]


def test_compile_per_trial_never_hits_the_recompile_limit() -> None:
    """Trials of a search, compiled with backend="eager": each has another architecture and batch
    size, so without a per-trial reset the model's code gathers cache entries (a train and an eval
    graph per trial) until dynamo's limit of 8 silently turns the 5th trial eager. With the reset
    every trial compiles its own two graphs."""
    from torch._dynamo.utils import counters

    rt = Runtime(compile_backend="eager")
    small = tiny_set(n_train=64, n_val=16)
    frames: list[int] = []
    for k in range(5):
        cfg = cfg_with(epochs=1, seed=k, batch_size=16 + 4 * k)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, blocks=(BlockConfig(4 + k), BlockConfig(8))))
        before = counters["frames"]["ok"]
        fit(cfg, small, CPU, runtime=rt)
        frames.append(counters["frames"]["ok"] - before)
    assert frames == [2] * 5  # a train graph and an eval graph (fixed shapes: no dynamic recompile)


def test_failed_trial_releases_the_model(data: ImageSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cuBLAS allocation failure in the middle of an epoch: by the time the study's handler
    runs, nothing holds the model (its device memory can be returned)."""
    from catdog_hpo.engine.device import classify_cuda_error, free_device_memory

    built: list[weakref.ref] = []
    real_build, real_augment = train_module.build_model, train_module.augment_batch
    chunks = [0]

    def tracking_build(*args: object, **kwargs: object) -> nn.Module:
        model = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    def failing_augment(*args: object, **kwargs: object) -> torch.Tensor:
        chunks[0] += 1
        if chunks[0] == 3:  # after two steps: optimizer state and static buffers exist
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train_module, "build_model", tracking_build)
    monkeypatch.setattr(train_module, "augment_batch", failing_augment)
    try:
        fit(cfg_with(epochs=2), data, CPU, runtime=Runtime(static_step=True, aug_chunk_values=3 * SIZE * SIZE * 32))
    except RuntimeError as exc:
        assert classify_cuda_error(exc) == "oom"
        free_device_memory()
        assert built and built[0]() is None
    else:
        pytest.fail("the error did not propagate")


# --------------------------------------------------------------------------- workers and failures


def test_pin_worker_device() -> None:
    from catdog_hpo.engine.device import pin_worker_device

    env: dict[str, str] = {}
    assert pin_worker_device("cuda:2", shared=False, env=env) == "cuda:0"
    assert env == {"CUDA_VISIBLE_DEVICES": "2"}
    env = {"CUDA_VISIBLE_DEVICES": "4,6", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    assert pin_worker_device("cuda:1", shared=True, env=env) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "6"  # the parent's own list: index 1 is GPU 6
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"  # the user's setting stays
    env = {}
    pin_worker_device("cuda:0", shared=True, env=env)
    assert env == {"CUDA_VISIBLE_DEVICES": "0", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert pin_worker_device("cpu", shared=True, env=env) == "cpu"


def _settings(devices: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from catdog_hpo.data import DataSource
    from catdog_hpo.search.settings import RunSettings

    return RunSettings(study="s", storage="sqlite:///unused.db", space="quick", sampler="random",
                       pruner="none", trials=1, data=DataSource(name="synthetic"),
                       workers=len(devices), devices=devices)


def test_a_worker_pins_its_gpu_before_working(monkeypatch: pytest.MonkeyPatch) -> None:
    """_worker_main sets CUDA_VISIBLE_DEVICES (and the allocator for a shared GPU) before
    ``work`` runs, and hands it cuda:0."""
    import signal

    from catdog_hpo.search import worker as worker_module

    seen: list[tuple[str, str | None, str | None]] = []

    def fake_work(settings: object, device: str, deadline: object) -> None:
        seen.append((device, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))

    from catdog_hpo.engine import device as device_module

    monkeypatch.setattr(worker_module, "work", fake_work)
    monkeypatch.setattr(device_module, "_pinned_as", None)  # restored to None afterwards
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker_module._worker_main(_settings(("cuda:3", "cuda:3")), 1, "cuda:3", None)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert seen == [("cuda:0", "3", "expandable_segments:True")]
    assert device_module.device_label(torch.device("cuda:0")) == "cuda:3"  # what its trials record


def test_shares_gpu() -> None:
    from catdog_hpo.search.worker import _shares_gpu

    assert _shares_gpu(_settings(("cuda:0", "cuda:0")), "cuda:0")
    assert not _shares_gpu(_settings(("cuda:0", "cuda:1")), "cuda:0")
    assert not _shares_gpu(_settings(("cuda:0", "cuda:1", "cuda:0")), "cuda:1")
    assert not _shares_gpu(_settings(("cpu", "cpu")), "cpu")


@pytest.mark.parametrize("exc, kind", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "oom"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "oom"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "sticky"),
    (RuntimeError("CUDA error: device-side assert triggered"), "sticky"),
    (ValueError("a plain bug"), None),
])
def test_classify_cuda_errors(exc: BaseException, kind: str | None) -> None:
    from catdog_hpo.engine.device import classify_cuda_error

    assert classify_cuda_error(exc) == kind
    wrapped = RuntimeError("backend='inductor' raised: see above")  # as dynamo wraps an error
    wrapped.__cause__ = exc
    assert classify_cuda_error(wrapped) == kind


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch without AcceleratorError")
def test_accelerator_error_is_sticky() -> None:
    from catdog_hpo.engine.device import classify_cuda_error

    try:
        err = torch.AcceleratorError("CUDA error: unknown error")
    except TypeError:  # a constructor that wants the error code too
        pytest.skip("AcceleratorError cannot be built here")
    assert classify_cuda_error(err) == "sticky"


def test_sticky_cuda_error_requeues_the_trial(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A sticky error fails the trial, queues its parameters again and stops this process
    (one in-process worker: a UserError saying to rerun); the rerun runs them first."""
    import optuna
    import yaml
    from optuna.trial import TrialState

    import catdog_hpo.search.run as run_mod
    import catdog_hpo.search.settings as settings_mod
    import catdog_hpo.search.worker as worker_mod
    from catdog_hpo.data import DataSource
    from catdog_hpo.errors import UserError
    from catdog_hpo.search.record import TrialKey
    from helpers import TINY_SPACE

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    s = settings_mod.RunSettings(study="s", storage=f"sqlite:///{tmp_path}/t.db", space=str(tmp_path / "tiny.yaml"),
                                 sampler="random", pruner="none", trials=1, data=DataSource(name="synthetic"),
                                 studies_dir=tmp_path / "studies", progress=False, heartbeat=2)

    def broken(trial: optuna.Trial, *args: object, **kw: object) -> float:
        trial.suggest_int("k", 1, 9)  # the trial has parameters to queue again
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker_mod, "run_trial", broken)
    with pytest.raises(UserError, match="queued again"):
        run_mod.run(s)
    study = optuna.load_study(study_name="s", storage=s.storage)
    failed = study.get_trials(states=(TrialState.FAIL,))
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(failed) == 1 and len(waiting) == 1
    assert waiting[0].system_attrs["fixed_params"] == failed[0].params and waiting[0].user_attrs[TrialKey.RETRY_OF] == failed[0].number


def test_gpu_bench_smoke_runs_on_the_cpu() -> None:
    """bench/gpu.py --device cpu --smoke: every table row prints (one K run: a spawned worker)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "bench" / "gpu.py"), "--device", "cpu", "--smoke", "--k", "1"],
                         capture_output=True, text=True, timeout=300, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| seed-000 CNN | 16 |")]
    assert [r.split("|")[3].strip() for r in rows] == [
        "engine", "engine eager", "engine + cudnn.benchmark", "plain loop (DataLoader, fp32, .item())"]
    assert all(float(r.split("|")[4].replace(",", "")) > 0 for r in rows)  # images/s measured
    k_rows = [line for line in out.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(k_rows) == 1 and float(k_rows[0].split("|")[2].replace(",", "")) > 0


def test_a_large_val_set_stays_uint8_and_gives_the_same_numbers(data: ImageSet, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_with(epochs=1)
    results = []
    for resident in (10**9, 10):  # normalised once / too big: normalised per val batch
        monkeypatch.setattr(train_module, "VAL_RESIDENT_VALUES", resident)
        torch.manual_seed(0)  # the same weights both times
        model = train_module.build_model(cfg.model, 2, SIZE)
        loop = train_module._make_loop(cfg, data, CPU, model, Runtime(channels_last=True))
        assert loop.val_n.dtype == (torch.float32 if resident > 10 else torch.uint8)
        results.append([t.item() for t in loop.evaluate()])
    assert results[0] == pytest.approx(results[1], rel=1e-6)
