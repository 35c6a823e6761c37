"""CUDA failure paths on the CPU (issue 22, item 3): CUDA errors, the context probe and CUDA
graph capture are simulated with monkeypatch, everything around them is the real code.

A sticky error restarts the worker (RESTART_EXIT) and its trial runs again exactly once; a
repeatable one (the context still works) fails the trial and the worker goes on; a retry is
never queued again; SIGTERM during graph capture stops the trial; workers sharing a GPU get a
memory share, scaled buffers and their cached memory freed after every trial; bench/gpu.py's
K run returns when a worker dies before the start barrier.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from torch import nn

import catdog_hpo.engine.train as train_module
import catdog_hpo.search.worker as worker_module
from catdog_hpo.config import OptimConfig, TrainConfig
from catdog_hpo.engine import device as device_module
from catdog_hpo.engine import graphstep, runtime
from catdog_hpo.engine.device import classify_cuda_error, cuda_context_works, gpu_memory_share
from catdog_hpo.engine.runtime import Runtime, for_device
from catdog_hpo.search import interrupts
from catdog_hpo.search.record import TrialKey
from helpers import TINY_SPACE
from study_factory import load_run_study, run_settings
from test_gpu_engine import SIZE, cfg_with, tiny_set

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def cuda_error(message: str) -> Exception:
    """What a CUDA runtime failure raises (torch.AcceleratorError; RuntimeError before 2.8)."""
    return getattr(torch, "AcceleratorError", RuntimeError)(message)


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "_gpu_workers", 1)  # configure_process sets them: restored after
    monkeypatch.setattr(runtime, "_deterministic", False)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield tmp_path
    for s, h in handlers.items():  # _worker_main installs the interrupt handlers
        signal.signal(s, h)


class Released:
    """Stands in for free_device_memory: counts the calls, and raises as torch.cuda.empty_cache
    does on a context a sticky error broke (until a fresh worker process starts)."""

    def __init__(self) -> None:
        self.calls = 0
        self.broken = False

    def __call__(self) -> None:
        self.calls += 1
        if self.broken:
            raise cuda_error("CUDA error: an illegal memory access was encountered")


class InlineProcess:
    """multiprocessing's Process run inline at start(): the monkeypatches hold in the 'worker',
    and its exit code is what sys.exit (or an escaping exception: 1) would give."""

    starts = 0
    on_start: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, target: Callable[..., None], args: tuple, daemon: bool = False) -> None:
        self.target, self.args = target, args
        self.exitcode: int | None = None
        self.pid = -1

    def start(self) -> None:
        InlineProcess.starts += 1
        InlineProcess.on_start()  # a fresh process: a fresh CUDA context
        try:
            self.target(*self.args)
            self.exitcode = 0
        except SystemExit as exc:
            self.exitcode = int(exc.code or 0)
        except BaseException:  # noqa: BLE001 (what a real process would die of)
            self.exitcode = 1

    def is_alive(self) -> bool:
        return False


class InlineContext:
    Process = InlineProcess


def fake_train(first_error: Exception | None) -> Callable[..., float]:
    """run_trial that samples a parameter and raises ``first_error`` on its first call only."""
    calls = [0]

    def run(trial: optuna.Trial, *args: object, **kwargs: object) -> float:
        trial.suggest_int("k", 1, 9)  # the trial has parameters to queue again
        calls[0] += 1
        if calls[0] == 1 and first_error is not None:
            raise first_error
        return 0.5

    return run


# --------------------------------------------------------------------------- sticky and repeatable errors


def test_sticky_error_restarts_the_worker_and_the_trial_runs_again_once(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Real training; the first augmentation raises an illegal address error and the probe says
    the context is gone. The old order (empty_cache first) died here with exit 1, unrestarted."""
    s = run_settings(workdir, trials=1, baseline=False)
    released = Released()
    real_augment, augments = train_module.augment_batch, [0]

    def augment(*args: Any, **kwargs: Any) -> torch.Tensor:
        augments[0] += 1
        if augments[0] == 1:
            released.broken = True  # from here this process's context is unusable
            raise cuda_error("CUDA error: an illegal memory access was encountered")
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment_batch", augment)
    monkeypatch.setattr(worker_module, "free_device_memory", released)
    monkeypatch.setattr(worker_module, "cuda_context_works", lambda device: False)
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: InlineContext)
    monkeypatch.setattr(InlineProcess, "starts", 0)
    monkeypatch.setattr(InlineProcess, "on_start", staticmethod(lambda: setattr(released, "broken", False)))
    exits: list[int | None] = []
    real_start = InlineProcess.start

    def start(self: InlineProcess) -> None:
        real_start(self)
        exits.append(self.exitcode)

    monkeypatch.setattr(InlineProcess, "start", start)

    worker_module.run_workers(s, None, progress=None)

    assert exits == [worker_module.RESTART_EXIT, 0]  # restarted once, then done
    assert "its trial is queued again and a new worker process takes over" in capsys.readouterr().err
    study = load_run_study(s)
    failed, done = study.get_trials(states=(TrialState.FAIL,)), study.get_trials(states=(TrialState.COMPLETE,))
    assert len(failed) == 1 and "illegal memory access" in failed[0].user_attrs[TrialKey.FAIL_REASON]
    retries = [t for t in study.trials if t.user_attrs.get(TrialKey.RETRY_OF) == failed[0].number]
    assert [t.number for t in retries] == [t.number for t in done]  # exactly once, and it finished
    assert done[0].params == failed[0].params and len(study.trials) == 2


@pytest.mark.parametrize("message", [
    "CUDA error: invalid configuration argument",  # known to be the config's, no probe needed
    "CUDA error: unknown error",  # suspected sticky: the probe finds the context working
])
def test_repeatable_cuda_error_fails_the_trial_and_the_worker_goes_on(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    from catdog_hpo.search.run import run

    s = run_settings(workdir, trials=2, baseline=False)
    released, probes = Released(), []
    monkeypatch.setattr(worker_module, "run_trial", fake_train(cuda_error(message)))
    monkeypatch.setattr(worker_module, "free_device_memory", released)
    monkeypatch.setattr(worker_module, "cuda_context_works", lambda device: probes.append(device) or True)
    assert run(s) == 0  # no WorkerRestart (a UserError in one in-process worker)
    study = load_run_study(s)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[0].user_attrs[TrialKey.FAIL_REASON].endswith(message)
    assert not any(TrialKey.RETRY_OF in t.user_attrs for t in study.trials)  # nothing queued again
    assert len(probes) == (message.endswith("unknown error"))
    assert released.calls == 3  # cached memory freed after every trial, not only the failed one


def test_a_retry_is_never_queued_again(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from catdog_hpo.search.study import open_study

    s = run_settings(workdir, trials=1, baseline=False)
    opened = open_study(s, "cpu")
    opened.study.enqueue_trial({"k": 3}, user_attrs={TrialKey.RETRY_OF: 7})  # a retry of trial 7
    monkeypatch.setattr(worker_module, "run_trial", fake_train(cuda_error("CUDA error: an illegal memory access")))
    monkeypatch.setattr(worker_module, "free_device_memory", Released())
    monkeypatch.setattr(worker_module, "cuda_context_works", lambda device: False)
    with pytest.raises(worker_module.WorkerRestart) as info:
        worker_module.work(s, "cpu", None, opened=opened)
    assert not info.value.queued and info.value.fate == "its trial is not queued again"
    study = load_run_study(s)
    assert [(t.state, t.params) for t in study.trials] == [(TrialState.FAIL, {"k": 3})]  # none WAITING


def test_a_context_that_fails_between_trials_restarts_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    released = Released()
    released.broken = True  # an error classified as not sticky that broke the context anyway
    monkeypatch.setattr(worker_module, "free_device_memory", released)
    with pytest.raises(worker_module.WorkerRestart, match="after trial 4: CUDA error: an illegal"):
        worker_module._release_memory(4)


def test_classify_and_probe_on_the_cpu() -> None:
    for message in ("invalid configuration argument", "no kernel image is available for execution on the device"):
        assert classify_cuda_error(cuda_error(f"CUDA error: {message}")) is None
    assert classify_cuda_error(cuda_error("CUDA error: an illegal memory access was encountered")) == "sticky"
    if hasattr(torch, "AcceleratorError"):  # unknown: suspected, the probe decides
        assert classify_cuda_error(torch.AcceleratorError("CUDA error: unknown error")) == "sticky"
    assert cuda_context_works(CPU) is None  # no context to probe: the message is trusted


# --------------------------------------------------------------------------- graph capture


class FakeCuda:
    """Just enough of torch.cuda for StaticStep's capture path to run its body on the CPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.streams = 0
        self.capturing = False
        self.end_raises = False  # capture_end fails (as it does when the capture was invalidated)
        fake = self

        class Stream:
            def __init__(self, device: object = None) -> None:
                fake.streams += 1

            def wait_stream(self, other: object) -> None:
                pass

        class Graph:
            def replay(self) -> None:
                pass

        current = Stream()  # the device's current stream: not a stream StaticStep makes
        self.streams = 0

        @contextlib.contextmanager
        def graph(g: object) -> Iterator[None]:
            fake.capturing = True
            try:
                yield
            finally:
                fake.capturing = False
                if fake.end_raises:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        for name, value in {"Stream": Stream, "CUDAGraph": Graph, "graph": graph,
                            "stream": lambda s: contextlib.nullcontext(),
                            "current_stream": lambda device=None: current,
                            "device": lambda d: contextlib.nullcontext(),
                            "synchronize": lambda device=None: None}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def static_step(capture: bool) -> graphstep.StaticStep:
    model = nn.Linear(12, 2)
    params = list(model.parameters())
    opt, _ = graphstep.graph_optimizer(params, OptimConfig(name="sgd", lr=0.1), CPU, fused=False)
    return graphstep.StaticStep(lambda x: model(x.flatten(1)), nn.CrossEntropyLoss(), opt, params, 0.0, None,
                                torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long), capture)


def steps(step: graphstep.StaticStep, n: int) -> None:
    for _ in range(n):
        step(torch.randn(4, 3, 2, 2), torch.randint(0, 2, (4,)))


def test_one_side_stream_per_static_step(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(monkeypatch)
    steps(static_step(capture=True), graphstep.WARMUP_STEPS)
    assert cuda.streams == 1  # made in __init__, not one per warm-up step


@pytest.mark.parametrize("end_raises", [False, True])
def test_sigterm_during_capture_stops_the_trial(monkeypatch: pytest.MonkeyPatch, end_raises: bool) -> None:
    """A SIGTERM whose handler raises inside the capture: not taken for a capture failure (the
    fallback's except would train on), even when ending the capture then fails on top of it."""
    assert not issubclass(interrupts.Terminated, Exception)
    cuda = FakeCuda(monkeypatch)
    cuda.end_raises = end_raises
    step = static_step(capture=True)
    real_body = step._body

    def body() -> None:
        if cuda.capturing:
            raise interrupts.Terminated()
        real_body()

    monkeypatch.setattr(step, "_body", body)
    steps(step, graphstep.WARMUP_STEPS)
    with pytest.raises(interrupts.Terminated):
        steps(step, 1)


def test_a_capture_failure_still_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    cuda = FakeCuda(monkeypatch)
    step = static_step(capture=True)
    real_body = step._body

    def body() -> None:
        if cuda.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        real_body()

    monkeypatch.setattr(step, "_body", body)
    steps(step, graphstep.WARMUP_STEPS + 2)
    assert step.graph is None and not step.capture and step.steps == graphstep.WARMUP_STEPS + 2
    assert "CUDA graph capture failed" in capsys.readouterr().err


# --------------------------------------------------------------------------- K workers on one GPU


@contextlib.contextmanager
def backend_flags() -> Iterator[None]:
    """Restore the process-wide backend flags a test changes (monkeypatch cannot: torch's
    flag modules have no real attributes to save)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_gpu_memory_share() -> None:
    assert gpu_memory_share(1) is None  # alone on its GPU: no cap
    for k in (2, 4, 8):
        share = gpu_memory_share(k)
        assert share == pytest.approx((1 - device_module.GPU_HEADROOM) / k)
        assert k * share + device_module.GPU_HEADROOM == pytest.approx(1.0)
    with pytest.raises(ValueError, match="workers_on_gpu=0"):
        gpu_memory_share(0)


def test_configure_process_caps_a_shared_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, object] = {}
    monkeypatch.setattr(runtime, "_gpu_workers", 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d=None: calls.__setitem__("fraction", f))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.__setitem__("threads", n))
    with backend_flags():  # configure_process turns TF32 on
        runtime.configure_process("cuda:0", workers_on_gpu=4)
        assert calls == {"fraction": gpu_memory_share(4), "threads": runtime.CUDA_WORKER_THREADS}
        assert for_device(torch.device("cuda"), TrainConfig()).gpu_workers == 4
        assert for_device(CPU, TrainConfig()).gpu_workers == 1
        calls.clear()
        runtime.configure_process("cuda:0", workers_on_gpu=1)  # alone: no cap, all CPU threads
        assert calls == {} and for_device(torch.device("cuda"), TrainConfig()).gpu_workers == 1


def test_a_shared_gpu_divides_the_chunk_and_the_resident_val_set(monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_set(n_train=128, n_val=40)
    chunks: list[int] = []
    real_augment = train_module.augment_batch

    def augment(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        chunks.append(x.shape[0])
        return real_augment(x, *args, **kwargs)

    monkeypatch.setattr(train_module, "augment_batch", augment)
    monkeypatch.setattr(train_module, "VAL_RESIDENT_VALUES", data.val_x.numel())  # just fits alone
    per_chunk = 3 * SIZE * SIZE * 32 * 4  # 4 batches of 32 per chunk
    for k, sizes, val_dtype in ((1, [128], torch.float32), (4, [32] * 4, torch.uint8)):
        chunks.clear()
        rt = Runtime(static_step=True, aug_chunk_values=per_chunk, gpu_workers=k)
        train_module.fit(cfg_with(epochs=1), data, CPU, runtime=rt)
        assert chunks == sizes
        assert train_module._validation(data, CPU, rt)[0].dtype == val_dtype


def test_a_shared_worker_keeps_one_image_size_on_the_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from catdog_hpo.data import DataSource
    from catdog_hpo.data import provider as provider_module

    monkeypatch.setattr(provider_module, "load_images", lambda source, size, cache: tiny_set())
    images = provider_module.ImageProvider(DataSource(name="synthetic"), tmp_path, CPU)
    images.get(16), images.get(32)
    assert images.resident_sizes() == [16, 32]  # alone on the GPU: every size stays
    images.keep_on_device(1)
    assert images.resident_sizes() == [32]
    images.get(16)
    assert images.resident_sizes() == [16]


# --------------------------------------------------------------------------- bench/gpu.py


def bench_gpu() -> Any:
    """bench/gpu.py as a module (its dataclasses need it in sys.modules while it loads)."""
    if "bench_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_gpu"]


class Exited:
    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode


def test_bench_start_barrier_returns_when_a_worker_dies() -> None:
    bench = bench_gpu()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"a worker exited \(code 1\)"):
        bench.wait_barrier(threading.Barrier(2), [Exited(1)], timeout_s=60)
    with pytest.raises(RuntimeError, match="not all ready after"):
        bench.wait_barrier(threading.Barrier(2), [Exited(None)], timeout_s=0.3)
    assert time.monotonic() - start < 5
    # a real spawned worker that dies before the barrier
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    dead = ctx.Process(target=os._exit, args=(3,))
    dead.start()
    with pytest.raises(RuntimeError, match=r"a worker exited \(code 3\)"):
        bench.wait_barrier(barrier, [dead], timeout_s=60)
    dead.join()
    assert time.monotonic() - start < 30


def test_bench_busy_fraction_and_fp32_plain_loop() -> None:
    import math

    bench = bench_gpu()
    assert math.isnan(bench.busy_fraction(0.0, [1.0]))  # no CUDA event recorded: n/a, not 0%
    assert math.isnan(bench.busy_fraction(0.4, []))  # no unprofiled steady epoch to divide by
    assert bench.busy_fraction(0.5, [1.0, 1.0]) == pytest.approx(0.5)
    with backend_flags():
        bench.set_backends(cudnn_benchmark=True, tf32=True)  # as the autotuned engine row leaves them
        cfg = bench.trial_config("cnn", 16, 1, smoke=True)
        bench.plain_loop(cfg, bench.synthetic(64, 8, 16, CPU), CPU, images=64, workers=0)
        assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32  # the row labelled fp32 is fp32

