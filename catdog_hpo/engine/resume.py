"""A fit's training state at an epoch's end, saved so an interrupted fit goes on from there.

What the next epoch draws on, and nothing else: the model's weights and buffers, the optimizer
(on the static step also its shadow, which the schedule steps), the moving average of the
weights (``train.ema``, engine/ema.py), the lr schedule, the epochs so
far with the best one (its weights too, unless the best is the epoch just saved), and every
random stream the next epoch reads: torch's default generator (dropout; on CUDA the device's
as well) and the loop's generator on the training device (the epoch's ``randperm`` and every
augmentation draw). Restored, the next epochs on the CPU are bit for bit those an uninterrupted
fit runs (tests/test_resume.py).

Files are ``torch.save`` of plain data (``weights_only`` loading: no code runs from a file),
written atomically (``files.atomic_write``). Saves alternate between two files, ``path`` and its
twin ``<stem>.b.pt``: the older is deleted and written anew, so the newest state is never
touched, and no rename lands on an existing file (on ext4 that forces the new file's data out
first, auto_da_alloc: a 49 MB state took 50-240 ms to replace against 15 ms this way). Loading
takes the newest valid one of the two. A file carries the fingerprint of the config and
data shape it was made for and the package version; ``load_state`` refuses one that is
missing, damaged, of another config or of another catdog-hpo version (``StateRejected``, one
line), and the caller starts from epoch 0. Which file belongs to which trial is the search's
business (``search.checkpoints``): no Optuna here.

The same module writes a trial's best-epoch weights (``save_weights``), the file ``export
--with-weights`` ships without retraining.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from catdog_hpo import __version__
from catdog_hpo.config import TrialConfig, to_dict
from catdog_hpo.files import atomic_write

if TYPE_CHECKING:
    from catdog_hpo.engine.epochs import EpochStats
    from catdog_hpo.engine.train import _Loop

STATE_FORMAT = "catdog-hpo-training-state"
WEIGHTS_FORMAT = "catdog-hpo-trial-weights"
FORMAT_VERSION = 1


class StateRejected(Exception):
    """A checkpoint that cannot be used; the message says which file and why, in one line."""


def fingerprint(cfg: TrialConfig, num_classes: int, n_train: int) -> str:
    """What a saved state is only valid for: the whole config, the classes and the training-set
    size (batches per epoch: the schedule's step count). 16 hex digits of SHA-256."""
    text = json.dumps({"config": to_dict(cfg), "classes": num_classes, "n_train": n_train},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class TrainingState:
    """A fit after ``epoch`` epochs, as ``load_state`` reads it back (tensors on the CPU)."""

    epoch: int  # epochs finished; the fit goes on at epoch + 1
    history: tuple[dict[str, float], ...]  # EpochStats.to_dict() of epochs 1..epoch
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    shadow: dict[str, Any] | None  # the static step's shadow optimizer (None: eager step)
    scheduler: dict[str, Any] | None
    rng: dict[str, torch.Tensor]  # "torch", "loop", and "cuda" when it trained on CUDA
    device_type: str  # "cpu" | "cuda": the random streams restore only onto the same kind
    best_epoch: int
    best_acc: float
    best_state: dict[str, torch.Tensor] | None  # None in the file when best_epoch == epoch: the model's (EMA's)
    source: Path | None = None  # the file it was read from (the next save goes to its twin)
    passed_over: str = ""  # why its twin, damaged or mismatched, was not used ("" when it was not)
    ema: dict[str, Any] | None = None  # WeightEMA.checkpoint() (None: train.ema off)


@dataclass(frozen=True)
class CheckpointSpec:
    """What ``train.fit`` saves and resumes. ``path`` None: nothing is written."""

    path: Path | None = None  # the training state, replaced (atomically) at each save
    every: int = 1  # epochs between saves; 0: never
    resume: TrainingState | None = None  # go on from this state (load_state) instead of epoch 1
    key: str = ""  # fingerprint(...) of this fit, written into each file

    def due(self, epoch: int, last: int) -> bool:
        """Save after ``epoch``? Never after the last one: a finished fit is not resumed."""
        return self.path is not None and self.every > 0 and epoch < last and epoch % self.every == 0


def _cpu(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors of a (nested) state dict on the CPU, strides kept. CPU tensors are not copied:
    torch.save writes them before training goes on."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().cpu()
        if isinstance(v, dict):
            return {k: one(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(one(x) for x in v)
        return v
    return one(state)


def state_paths(path: Path) -> tuple[Path, Path]:
    """The two files a fit's state alternates between: ``path`` and its twin ``<stem>.b<suffix>``."""
    path = Path(path)
    return path, path.with_name(f"{path.stem}.b{path.suffix}")


def twin_base(name: str) -> str:
    """The name a state file goes by (``path``'s), for either of the two files."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem[:-2]}.{suffix}" if dot and stem.endswith(".b") else name


def save(spec: CheckpointSpec, loop: _Loop, epoch: int, history: list[EpochStats],
         best: tuple[int, float, dict[str, torch.Tensor] | None],
         newest: Path | None) -> Path | None:
    """Write the state after ``epoch`` into the file that does not hold ``newest`` (the last
    state saved or resumed from); returns it, or None when the write failed. At an epoch's end,
    after its one sync: the copies below are the only device reads. A failed write (disk full, a
    vanished share) warns, and the fit trains on without checkpoints."""
    best_epoch, best_acc, best_state = best
    device = loop.train_x.device
    rng = {"torch": torch.get_rng_state(), "loop": loop.gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    payload = {
        "format": STATE_FORMAT, "format_version": FORMAT_VERSION, "catdog_hpo_version": __version__,
        "fingerprint": spec.key, "epoch": epoch, "device_type": device.type,
        "history": [h.to_dict() for h in history],
        "model": _cpu(loop.model.state_dict()),
        "optimizer": _cpu(loop.optimizer.state_dict()),
        "shadow": loop.shadow.state_dict() if loop.shadow is not None else None,
        "ema": _cpu(loop.ema.checkpoint()) if loop.ema is not None else None,
        "scheduler": loop.schedule.scheduler.state_dict() if loop.schedule.scheduler is not None else None,
        "rng": rng, "best_epoch": best_epoch, "best_acc": best_acc,
        # the best epoch is often the one just saved: its weights are "model" (or the EMA's) already
        "best_state": None if best_epoch == epoch else best_state,
    }
    main, twin = state_paths(spec.path)
    target = twin if newest == main else main
    try:
        target.unlink(missing_ok=True)  # the older state: the newest stays whole in the other file
        atomic_write(target, lambda tmp: _save_fast(payload, tmp))
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as RuntimeError
        warnings.warn(f"checkpoint: cannot write {target} ({str(exc).splitlines()[0]}); "
                      "this trial trains on without checkpoints")
        return None
    return target


def _save_fast(payload: dict[str, Any], path: Path) -> None:
    """torch.save without the zip entries' CRC-32 (torch >= 2.6 can skip it): on a ResNet-18's
    128 MB state the checksum took about as long as the write. A torn file cannot appear (the
    write is atomic); a cut-short copy still fails to open as a zip archive."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # an older torch: with the checksum
        torch.save(payload, path)
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(payload, path)
    finally:
        config.save.compute_crc32 = before


def restore(loop: _Loop, state: TrainingState) -> None:
    """Put ``state`` into a freshly made loop: weights, optimizer, schedule, random streams."""
    loop.model.load_state_dict(state.model)
    lr_tensor = loop.lr_tensor
    loop.optimizer.load_state_dict(state.optimizer)
    if lr_tensor is not None and hasattr(loop.optimizer, "param_groups"):
        for group in loop.optimizer.param_groups:  # the static step reads its lr from this tensor
            group["lr"] = lr_tensor
    if loop.shadow is not None and state.shadow is not None:
        loop.shadow.load_state_dict(state.shadow)
    if loop.ema is not None and state.ema is not None:  # the fingerprint (config) makes them go together
        loop.ema.load(state.ema)
    if loop.schedule.scheduler is not None and state.scheduler is not None:
        loop.schedule.scheduler.load_state_dict(state.scheduler)
    # (the static step copies the shadow's restored lr into its lr tensor at its next step)
    torch.set_rng_state(state.rng["torch"])  # the CPU's default generator: dropout on the CPU
    device = loop.train_x.device
    if state.device_type == device.type:  # a CPU generator's state does not fit a CUDA one
        loop.gen.set_state(state.rng["loop"])
        if device.type == "cuda" and "cuda" in state.rng:
            torch.cuda.set_rng_state(state.rng["cuda"], device)
    else:
        warnings.warn(f"checkpoint: saved on {state.device_type}, resumed on {device.type}: same weights "
                      "and optimizer, fresh random streams (the rest of the run is not bit-identical)")


def load_state(path: Path, key: str) -> TrainingState:
    """The newest state of ``path`` and its twin (``state_paths``) that was saved for ``key``
    (``fingerprint``) by this version; StateRejected with the reason when neither was."""
    found, rejected = [], []
    for candidate in state_paths(path):
        try:
            found.append(_load_one(candidate, key))
        except StateRejected as exc:
            if candidate.exists():
                rejected.append(str(exc))
    if not found:
        raise StateRejected(rejected[0] if rejected else f"{path}: no such file")
    state = max(found, key=lambda s: s.epoch)
    return dataclasses.replace(state, passed_over="; ".join(rejected))


def _load_one(path: Path, key: str) -> TrainingState:
    data = _read(Path(path), STATE_FORMAT)
    if data.get("fingerprint") != key:
        raise StateRejected(f"{path}: saved for another config or data")
    try:
        epoch = int(data["epoch"])
        model = data["model"]
        ema = data.get("ema")
        kept = ema["state"] if ema is not None else model  # what the epoch validated and kept
        return TrainingState(
            epoch=epoch, history=tuple(data["history"]), model=model, optimizer=data["optimizer"],
            shadow=data["shadow"], scheduler=data["scheduler"], rng=data["rng"],
            device_type=str(data["device_type"]), best_epoch=int(data["best_epoch"]),
            best_acc=float(data["best_acc"]),
            best_state=data["best_state"] if data["best_state"] is not None else kept, source=Path(path),
            ema=ema)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateRejected(f"{path}: damaged ({type(exc).__name__}: {exc})") from None


def _read(path: Path, kind: str) -> dict[str, Any]:
    if not path.is_file():
        raise StateRejected(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a torn or foreign file is not one
        raise StateRejected(f"{path}: damaged (not a PyTorch file)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged archive, a pickle that is not plain data
        raise StateRejected(f"{path}: damaged ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict) or data.get("format") != kind:
        raise StateRejected(f"{path}: not a {kind} file")
    if data.get("format_version") != FORMAT_VERSION or data.get("catdog_hpo_version") != __version__:
        raise StateRejected(f"{path}: saved by catdog-hpo {data.get('catdog_hpo_version')} (format "
                            f"{data.get('format_version')}), this is {__version__} (format {FORMAT_VERSION})")
    return data


# --------------------------------------------------------------------------- a trial's best weights


def save_weights(path: Path, state: dict[str, torch.Tensor], cfg: TrialConfig, classes: tuple[str, ...],
                 key: str, epoch: int, val_acc: float) -> None:
    """The weights of a fit's best epoch, with what they are (config, classes, epoch, accuracy)."""
    payload = {"format": WEIGHTS_FORMAT, "format_version": FORMAT_VERSION, "catdog_hpo_version": __version__,
               "fingerprint": key, "config": to_dict(cfg), "classes": [str(c) for c in classes],
               "epoch": int(epoch), "val_acc": float(val_acc), "state_dict": state}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_weights(path: Path) -> dict[str, Any]:
    """A ``save_weights`` file as a dict (state_dict, config, classes, epoch, val_acc,
    fingerprint); StateRejected when it is missing, damaged or of another version."""
    data = _read(Path(path), WEIGHTS_FORMAT)
    missing = [k for k in ("state_dict", "config", "classes", "epoch", "val_acc", "fingerprint") if k not in data]
    if missing:
        raise StateRejected(f"{path}: damaged (no {missing[0]!r} entry)")
    return data
