"""Resuming a fit from its saved training state (engine.resume): bit for bit on the CPU, and
files that must not be resumed from (missing, damaged, another config, another version)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from catdog_hpo.config import AugmentConfig, BlockConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig
from catdog_hpo.data import ImageSet
from catdog_hpo.engine import resume
from catdog_hpo.engine.resume import CheckpointSpec, StateRejected, fingerprint, load_state
from catdog_hpo.engine.runtime import Runtime
from catdog_hpo.engine.epochs import EpochStats, FitResult
from catdog_hpo.engine.train import fit

CPU = torch.device("cpu")
SIZE = 16  # px
EPOCHS = 5


def learnable_set(n_train: int = 160, n_val: int = 64, classes: int = 3) -> ImageSet:
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randint(0, 160, (n, 3, SIZE, SIZE), generator=g).float()
        x[torch.arange(n), y % 3] += 70
        return x.clamp(0, 255).to(torch.uint8), y

    tx, ty = make(n_train)
    vx, vy = make(n_val)
    return ImageSet(tx, ty, vx, vy, tuple(f"c{i}" for i in range(classes)), fingerprint="resume-test")


@pytest.fixture(scope="module")
def data() -> ImageSet:
    return learnable_set()


def config(optim: str = "adam", scheduler: str = "step", **optim_kw: object) -> TrialConfig:
    # dropout, resized crops, flips and colour jitter: every random stream an epoch draws from
    model = ModelConfig(blocks=(BlockConfig(8), BlockConfig(16)), head="fc", fc_hidden=16, dropout=0.3)
    return TrialConfig(image_size=SIZE, model=model,
                       augment=AugmentConfig(crop="resized", flip=True, color_jitter=True, strength=0.8),
                       optim=OptimConfig(name=optim, scheduler=scheduler, step_size=2, lr=3e-3, **optim_kw),
                       train=TrainConfig(epochs=EPOCHS, batch_size=32, seed=3))


def timeless(history: list[EpochStats]) -> list[dict]:
    return [{**h.to_dict(), "seconds": 0.0} for h in history]


class Stop(Exception):
    pass


def interrupted_then_resumed(cfg: TrialConfig, data: ImageSet, path: Path, stop_after: int,
                             runtime: Runtime | None = None) -> tuple[FitResult, list[int]]:
    """A fit stopped in epoch stop_after + 1 (its state saved after stop_after), then a fresh fit
    resumed from the file; returns the resumed result and the epochs its on_epoch_end saw."""
    key = fingerprint(cfg, len(data.classes), data.train_x.shape[0])

    def stop(stats: EpochStats) -> None:
        if stats.epoch == stop_after + 1:
            raise Stop  # before that epoch's save: the file holds epoch stop_after
    with pytest.raises(Stop):
        fit(cfg, data, CPU, on_epoch_end=stop, runtime=runtime, checkpoint=CheckpointSpec(path, 1, key=key))
    state = load_state(path, key)
    assert state.epoch == stop_after
    seen: list[int] = []
    result = fit(cfg, data, CPU, on_epoch_end=lambda s: seen.append(s.epoch), runtime=runtime,
                 checkpoint=CheckpointSpec(path, 1, resume=state, key=key))
    return result, seen


@pytest.mark.parametrize("optim, scheduler, kw", [
    ("adam", "step", {}),
    ("sgd", "onecycle", {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", "plateau", {"momentum": 0.5}),
    ("adamw", "cosine", {}),
])
def test_a_resumed_fit_ends_with_the_uninterrupted_history(data: ImageSet, tmp_path: Path, optim: str,
                                                           scheduler: str, kw: dict) -> None:
    cfg = config(optim, scheduler, **kw)
    whole = fit(cfg, data, CPU)
    resumed, seen = interrupted_then_resumed(cfg, data, tmp_path / "state.pt", stop_after=2)
    assert seen == [3, 4, 5]  # only the new epochs are reported again
    assert timeless(resumed.history) == timeless(whole.history)
    assert (resumed.best_epoch, resumed.best_val_acc) == (whole.best_epoch, whole.best_val_acc)
    assert all(torch.equal(resumed.best_state[k], whole.best_state[k]) for k in whole.best_state)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_the_static_step_resumes_too(data: ImageSet, tmp_path: Path, optim: str) -> None:
    """The CUDA path's static step (device lr, shadow optimizer, ForeachSGD), run on the CPU."""
    cfg = config(optim, "cosine", momentum=0.9)
    rt = Runtime(channels_last=True, static_step=True)
    whole = fit(cfg, data, CPU, runtime=rt)
    resumed, _ = interrupted_then_resumed(cfg, data, tmp_path / "state.pt", stop_after=3, runtime=rt)
    assert timeless(resumed.history) == timeless(whole.history)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
def test_the_weight_average_resumes_too(data: ImageSet, tmp_path: Path, static: bool) -> None:
    """train.ema: the average and its warm-up step count are saved and restored, so validation,
    the best epoch and the kept (averaged) weights match the uninterrupted fit."""
    cfg = config("sgd", "cosine", momentum=0.9)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema=0.8))
    rt = Runtime(channels_last=True, static_step=True) if static else None
    whole = fit(cfg, data, CPU, runtime=rt)
    resumed, _ = interrupted_then_resumed(cfg, data, tmp_path / "state.pt", stop_after=2, runtime=rt)
    assert timeless(resumed.history) == timeless(whole.history)
    assert (resumed.best_epoch, resumed.best_val_acc) == (whole.best_epoch, whole.best_val_acc)
    assert all(torch.equal(resumed.best_state[k], whole.best_state[k]) for k in whole.best_state)


def test_a_saved_best_epoch_is_the_average_it_validated(data: ImageSet, tmp_path: Path) -> None:
    """The file leaves out best_state when the best epoch is the saved one: with train.ema it is
    read back as the average, not the raw weights. The first two epochs of a 3-epoch fit are a
    2-epoch fit's (StepLR does not depend on the epoch count)."""
    def ema_cfg(epochs: int) -> TrialConfig:
        cfg = config("adam", "step")
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema=0.8, epochs=epochs))
    path = tmp_path / "state.pt"
    key = fingerprint(ema_cfg(3), 3, data.train_x.shape[0])
    fit(ema_cfg(3), data, CPU, checkpoint=CheckpointSpec(path, 1, key=key))
    state = load_state(path, key)
    two = fit(ema_cfg(2), data, CPU)
    assert state.epoch == 2 and state.ema is not None and state.best_epoch == two.best_epoch
    assert all(torch.equal(state.best_state[k], two.best_state[k]) for k in two.best_state)


def test_nothing_is_saved_after_the_last_epoch_nor_when_the_fit_is_stopped(data: ImageSet, tmp_path: Path) -> None:
    cfg = dataclasses.replace(config(), train=dataclasses.replace(config().train, epochs=2))
    path = tmp_path / "state.pt"
    key = fingerprint(cfg, 3, data.train_x.shape[0])
    fit(cfg, data, CPU, checkpoint=CheckpointSpec(path, 1, key=key))
    assert load_state(path, key).epoch == 1  # epoch 2 is the last: not saved
    path.unlink()

    def prune(stats: EpochStats) -> None:
        raise Stop  # the study's TrialPruned at epoch 1
    with pytest.raises(Stop):
        fit(cfg, data, CPU, on_epoch_end=prune, checkpoint=CheckpointSpec(path, 1, key=key))
    assert not path.exists()
    cfg4 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=4))
    fit(cfg4, data, CPU, checkpoint=CheckpointSpec(path, 2, key=key))  # every 2 epochs: after epoch 2 only
    assert load_state(path, key).epoch == 2


def test_files_that_are_not_resumed_from(data: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config()
    key = fingerprint(cfg, 3, data.train_x.shape[0])
    path = tmp_path / "state.pt"
    with pytest.raises(StateRejected, match="no such file"):
        load_state(path, key)
    fit(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2)), data, CPU,
        checkpoint=CheckpointSpec(path, 1, key=key))
    assert load_state(path, key).epoch == 1
    other = fingerprint(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-2)), 3, 160)
    assert other != key and fingerprint(cfg, 2, 160) != key and fingerprint(cfg, 3, 161) != key
    with pytest.raises(StateRejected, match="another config"):
        load_state(path, other)
    monkeypatch.setattr(resume, "__version__", "9.9.9")
    with pytest.raises(StateRejected, match="saved by catdog-hpo 0.1.0.*this is 9.9.9"):
        load_state(path, key)
    monkeypatch.undo()
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # torn (a copy cut short; our own writes are atomic)
    with pytest.raises(StateRejected, match="damaged"):
        load_state(path, key)
    path.write_bytes(b"\0" * 64)
    with pytest.raises(StateRejected, match="damaged"):
        load_state(path, key)
    for message in ("no such file", "another config", "damaged"):
        assert "\n" not in message


def test_saves_alternate_between_two_files_and_a_damaged_newer_one_falls_back(data: ImageSet, tmp_path: Path) -> None:
    cfg = dataclasses.replace(config(), train=dataclasses.replace(config().train, epochs=4))
    key = fingerprint(cfg, 3, data.train_x.shape[0])
    path = tmp_path / "trial-0-ab.pt"
    fit(cfg, data, CPU, checkpoint=CheckpointSpec(path, 1, key=key))  # epochs 1, 2, 3 saved
    main, twin = resume.state_paths(path)
    assert twin.name == "trial-0-ab.b.pt" and resume.twin_base(twin.name) == path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial-0-ab.b.pt", "trial-0-ab.pt"]  # no temp files left
    state = load_state(path, key)
    assert (state.epoch, state.source, state.passed_over) == (3, main, "")
    main.write_bytes(main.read_bytes()[:500])  # the newer one damaged: the older one still resumes
    state = load_state(path, key)
    assert state.epoch == 2 and state.source == twin and "damaged" in state.passed_over
    resumed = fit(cfg, data, CPU, checkpoint=CheckpointSpec(path, 1, resume=state, key=key))
    whole = fit(cfg, data, CPU)
    assert timeless(resumed.history) == timeless(whole.history)
    assert load_state(path, key).source == main  # the next save went into the other file (the damaged one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_the_cuda_path_resumes(data: ImageSet, tmp_path: Path) -> None:
    """On CUDA (graph-captured static step, the loop's generator on the device): the resumed fit
    goes on after the saved epoch with that epoch's history; bit-exactness is a CPU promise."""
    cuda = torch.device("cuda")
    cfg = config("sgd", "onecycle", momentum=0.9)
    key = fingerprint(cfg, 3, data.train_x.shape[0])
    path = tmp_path / "state.pt"

    def stop(stats: EpochStats) -> None:
        if stats.epoch == 3:
            raise Stop
    with pytest.raises(Stop):
        fit(cfg, data, cuda, on_epoch_end=stop, checkpoint=CheckpointSpec(path, 1, key=key))
    state = load_state(path, key)
    assert state.epoch == 2 and state.device_type == "cuda" and "cuda" in state.rng
    seen: list[int] = []
    result = fit(cfg, data, cuda, on_epoch_end=lambda s: seen.append(s.epoch),
                 checkpoint=CheckpointSpec(path, 1, resume=state, key=key))
    assert seen == [3, 4, 5] and result.status == "completed"
    assert [h.to_dict() for h in result.history[:2]] == list(state.history)
