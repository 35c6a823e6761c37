"""fit(): learning, the non-finite stop, determinism, optimizers/schedulers, callbacks."""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import catdog_hpo.engine.train as train_module
from catdog_hpo.config import AugmentConfig, BlockConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig
from catdog_hpo.config import OPTIMIZERS as OPTIMIZER_CHOICES, SCHEDULERS as SCHEDULER_CHOICES
from catdog_hpo.data import ImageSet
from catdog_hpo.ship.checkpoint import load_checkpoint, load_model, save_checkpoint
from catdog_hpo.engine.device import assign_gpus, parse_gpus, resolve_device
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.engine.models import build_model
from catdog_hpo.engine.epochs import EpochStats
from catdog_hpo.engine.optim import OPTIMIZERS, SCHEDULERS
from catdog_hpo.engine.train import fit

CPU = torch.device("cpu")
SIZE = 16  # px


def learnable_set(n_train: int = 192, n_val: int = 96, classes: int = 3, seed: int = 0) -> ImageSet:
    """Noisy images whose class is their dominant colour channel (survives flips and crops)."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randint(0, 160, (n, 3, SIZE, SIZE), generator=g).float()
        x[torch.arange(n), y % 3] += 70  # class signal, buried in +-80 of per-pixel noise
        if classes > 3:  # classes 3.. are brighter versions of 0..
            x[y >= 3] += 25
        return x.clamp(0, 255).to(torch.uint8), y

    tx, ty = make(n_train)
    vx, vy = make(n_val)
    return ImageSet(tx, ty, vx, vy, tuple(f"c{i}" for i in range(classes)), fingerprint=f"learnable-{seed}")


def small_cfg(**train_kw) -> TrialConfig:
    model = ModelConfig(blocks=(BlockConfig(8), BlockConfig(16)), head="gap", dropout=0.1)
    train = TrainConfig(**{"epochs": 2, "batch_size": 32, **train_kw})
    return TrialConfig(image_size=SIZE, model=model, augment=AugmentConfig(crop="pad"), train=train)


@pytest.fixture(scope="module")
def data() -> ImageSet:
    return learnable_set()


def without_time(history: list[EpochStats]) -> list[EpochStats]:
    return [dataclasses.replace(s, seconds=0.0) for s in history]


def test_learns_well_above_chance(data: ImageSet) -> None:
    cfg = dataclasses.replace(small_cfg(epochs=4), optim=OptimConfig(lr=3e-3, scheduler="none"))
    result = fit(cfg, data, CPU)
    assert result.status == "completed" and result.reason == ""
    assert [s.epoch for s in result.history] == [1, 2, 3, 4]
    assert result.best_val_acc >= 0.8  # chance is 1/3
    assert result.best_val_acc == max(s.val_acc for s in result.history)
    assert result.history[result.best_epoch - 1].val_acc == result.best_val_acc
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_best_state_is_the_best_epoch(data: ImageSet) -> None:
    cfg = small_cfg(epochs=3)
    result = fit(cfg, data, CPU)
    assert result.best_state is not None
    assert all(t.device.type == "cpu" for t in result.best_state.values())
    model = build_model(cfg.model, 3, SIZE)
    model.load_state_dict(result.best_state)
    model.eval()
    from catdog_hpo.engine.augment import normalize_batch

    with torch.no_grad():
        acc = (model(normalize_batch(data.val_x)).argmax(1) == data.val_y).float().mean().item()
    assert acc == pytest.approx(result.best_val_acc, abs=1e-6)


def test_same_seed_same_history_other_seed_differs(data: ImageSet) -> None:
    a = fit(small_cfg(seed=7), data, CPU)
    b = fit(small_cfg(seed=7), data, CPU)
    c = fit(small_cfg(seed=8), data, CPU)
    assert without_time(a.history) == without_time(b.history)
    for key in a.best_state:
        assert torch.equal(a.best_state[key], b.best_state[key])
    assert without_time(a.history) != without_time(c.history)


def test_huge_lr_stops_non_finite(data: ImageSet) -> None:
    cfg = dataclasses.replace(small_cfg(epochs=3), optim=OptimConfig(name="sgd", lr=1e30, scheduler="none"))
    seen: list[EpochStats] = []
    result = fit(cfg, data, CPU, on_epoch_end=seen.append)
    assert result.status == "non_finite"
    assert result.reason.startswith("non-finite training loss at epoch ")
    stopped = int(result.reason.rsplit(" ", 1)[1])
    assert len(result.history) == stopped - 1 == len(seen)  # the bad epoch is neither kept nor reported
    assert all(math.isfinite(s.train_loss) for s in result.history)


class NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((2, 3))) * float("nan")


def test_nan_model_stops_at_epoch_one(data: ImageSet) -> None:
    seen: list[EpochStats] = []
    result = fit(small_cfg(epochs=5), data, CPU, on_epoch_end=seen.append, model=NaNModel())
    assert (result.status, result.reason) == ("non_finite", "non-finite training loss at epoch 1")
    assert result.history == [] and seen == []
    assert (result.best_epoch, result.best_state) == (0, None)


@pytest.mark.parametrize("name", OPTIMIZER_CHOICES)
def test_each_optimizer_trains(data: ImageSet, name: str) -> None:
    assert set(OPTIMIZERS) == set(OPTIMIZER_CHOICES)
    lr = 1e-2 if name == "sgd" else 1e-3
    cfg = dataclasses.replace(small_cfg(), optim=OptimConfig(name=name, lr=lr, nesterov=name == "sgd"))
    before = build_model(cfg.model, 3, SIZE).state_dict()  # fit seeds the same init
    result = fit(cfg, data, CPU)
    assert result.status == "completed" and len(result.history) == 2
    assert not torch.equal(before["features.0.weight"], result.best_state["features.0.weight"])


def test_nesterov_without_momentum_is_a_config_error(data: ImageSet) -> None:
    cfg = dataclasses.replace(small_cfg(), optim=OptimConfig(name="sgd", momentum=0.0, nesterov=True))
    with pytest.raises(ConfigError, match="optim.nesterov"):
        fit(cfg, data, CPU)


@pytest.mark.parametrize("scheduler", SCHEDULER_CHOICES)
def test_each_scheduler(data: ImageSet, scheduler: str) -> None:
    assert set(SCHEDULERS) == set(SCHEDULER_CHOICES)
    optim = OptimConfig(lr=1e-3, scheduler=scheduler, step_size=1, gamma=0.5)
    result = fit(dataclasses.replace(small_cfg(epochs=3), optim=optim), data, CPU)
    assert result.status == "completed"
    lrs = [s.lr for s in result.history]
    if scheduler == "none":
        assert lrs == [1e-3] * 3
    elif scheduler == "step":
        assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4])
    elif scheduler == "cosine":
        assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2] > 0
    elif scheduler == "onecycle":
        assert lrs[0] < lrs[1] and lrs[1] <= 1e-3 + 1e-12  # warms up toward the peak lr
    else:  # plateau: patience 2, so no cut within 3 epochs of a loss that (mostly) falls
        assert lrs[0] == pytest.approx(1e-3)


def test_accum_steps_and_grad_clip(data: ImageSet, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    clips: list[float] = []
    real_clip = nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", spy)
    try:
        # 192 images / batch 16 = 12 batches; accum 5 -> steps after batches 5, 10, 12 = 3 per epoch
        result = fit(small_cfg(batch_size=16, accum_steps=5, grad_clip=0.5), data, CPU)
    finally:
        handle.remove()
    assert result.status == "completed"
    assert len(steps) == 2 * 3
    assert clips == [0.5] * 6


def test_frozen_parameters_stay_put(data: ImageSet) -> None:
    cfg = small_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, SIZE)
    for p in model.features.parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.features.state_dict().items() if "running" not in k and "num_batches" not in k}
    head = model.head[-1].weight.detach().clone()
    fit(cfg, data, CPU, model=model)
    for k, v in frozen.items():
        assert torch.equal(model.features.state_dict()[k], v), k
    assert not torch.equal(model.head[-1].weight, head)


def test_on_epoch_end_sees_every_epoch(data: ImageSet) -> None:
    seen: list[EpochStats] = []
    cfg = dataclasses.replace(small_cfg(epochs=3), augment=AugmentConfig(crop="resized", color_jitter=True))
    result = fit(cfg, data, CPU, on_epoch_end=seen.append)
    assert seen == result.history and [s.epoch for s in seen] == [1, 2, 3]
    for s in seen:
        assert 0.0 <= s.val_acc <= 1.0 and s.seconds > 0 and s.train_loss > 0 and s.val_loss > 0


class Stop(Exception):
    pass


def test_exception_from_on_epoch_end_propagates(data: ImageSet) -> None:
    raised = Stop("pruned")
    seen: list[int] = []

    def callback(stats: EpochStats) -> None:
        seen.append(stats.epoch)
        if stats.epoch == 2:
            raise raised

    with pytest.raises(Stop) as info:
        fit(small_cfg(epochs=4), data, CPU, on_epoch_end=callback)
    assert info.value is raised and seen == [1, 2]


def test_out_of_memory_releases_the_model(data: ImageSet, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[weakref.ref] = []
    real_build = train_module.build_model

    def tracking_build(*args, **kwargs) -> nn.Module:
        model = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    def oom(stats: EpochStats) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "build_model", tracking_build)
    try:
        fit(small_cfg(), data, CPU, on_epoch_end=oom)
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        # still inside the handler, with the traceback alive: the model must already be gone
        assert built and built[0]() is None
    else:
        pytest.fail("the out-of-memory error did not propagate")


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path: Path, data: ImageSet) -> None:
    cfg = small_cfg(epochs=1)
    result = fit(cfg, data, CPU)
    path = tmp_path / "sub" / "best.pt"
    metrics = {"val_acc": result.best_val_acc, "history": [s.to_dict() for s in result.history], "note": None}
    save_checkpoint(path, result.best_state, cfg, data.classes, metrics)
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["format"] == "catdog-hpo-checkpoint" and raw["format_version"] == 1
    ck = load_checkpoint(path)
    assert ck.config == cfg and ck.classes == data.classes and ck.image_size == SIZE
    assert ck.metrics == metrics and len(ck.mean) == len(ck.std) == 3
    model, ck2 = load_model(path, CPU)
    assert not model.training and ck2.config == cfg
    for key, value in result.best_state.items():
        assert torch.equal(model.state_dict()[key], value)


def test_checkpoint_errors(tmp_path: Path, data: ImageSet) -> None:
    with pytest.raises(UserError, match=r"missing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"notes.pt: not a catdog-hpo checkpoint"):
        load_checkpoint(text)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(UserError, match=r"plain.pt: not a catdog-hpo checkpoint"):
        load_checkpoint(plain)
    cfg = small_cfg(epochs=1)
    state = build_model(cfg.model, 3, SIZE).state_dict()
    future = tmp_path / "future.pt"
    save_checkpoint(future, state, cfg, data.classes, {})
    raw = torch.load(future, weights_only=True)
    raw["format_version"] = 2
    torch.save(raw, future)
    with pytest.raises(UserError, match=r"future.pt: checkpoint format_version 2"):
        load_checkpoint(future)
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, state, cfg, ("a", "b"), {})  # 2 classes; the weights have 3 outputs
    with pytest.raises(UserError, match=r"wrong.pt: weights do not fit the model"):
        load_model(wrong, CPU)


# --------------------------------------------------------------------------- devices


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match=f"--device {name}: no CUDA GPU"):
                resolve_device(name)


def test_parse_gpus() -> None:
    assert parse_gpus(None, 3) == [0, 1, 2] and parse_gpus(None, 0) == []
    assert parse_gpus("1, 0", 2) == [1, 0]
    for text, message in (("0,x", "'x' is not a GPU id"), ("2", "GPU 2 does not exist"),
                          ("0,0", "GPU 0 is listed twice"), ("", "'' is not a GPU id"), ("-1", "'-1'")):
        with pytest.raises(UserError, match=message):
            parse_gpus(text, 2)
    with pytest.raises(UserError, match="no GPUs"):
        parse_gpus("0", 0)


def test_assign_gpus() -> None:
    assert assign_gpus(5, [0, 1]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert assign_gpus(2, [3]) == ["cuda:3", "cuda:3"]
    assert assign_gpus(3, []) == ["cpu", "cpu", "cpu"]
