"""Checkpoint files: weights plus everything needed to rebuild and feed the model.

A checkpoint is ``torch.save`` of a plain dict that ``torch.load(weights_only=True)`` reads
(tensors, str, int, float, bool, list, dict only): no pickled classes, so loading one never
runs code from the file.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from catdog_hpo import __version__
from catdog_hpo.config import ModelConfig, TrialConfig, from_dict, to_dict
from catdog_hpo.engine.augment import MEAN, STD
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.files import atomic_write
from catdog_hpo.engine.models import build_model

FORMAT = "catdog-hpo-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: TrialConfig
    classes: tuple[str, ...]
    image_size: int  # px, square
    mean: list[float]  # per-channel normalisation on the [0, 1] scale: (x - mean) / std
    std: list[float]
    metrics: dict[str, Any]


def _plain(value: Any, where: str) -> Any:
    """``value`` as the plain types weights_only loading accepts (tuples become lists)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} cannot go into a checkpoint")


def save_checkpoint(path: Path, model_state: dict[str, torch.Tensor], cfg: TrialConfig,
                    classes: Sequence[str], metrics: dict[str, Any]) -> None:
    """Write the checkpoint atomically (``files.atomic_write``: no half-written file)."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()},
        "config": to_dict(cfg),
        "classes": [str(c) for c in classes],
        "image_size": int(cfg.image_size),
        "mean": list(MEAN),
        "std": list(STD),
        "metrics": _plain(metrics, "metrics"),
        "catdog_hpo_version": __version__,
    }
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint; a missing file, another file type or another format version -> UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise UserError(f"{path}: not a catdog-hpo checkpoint (not a PyTorch file)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that is not plain data, a damaged archive: not our file
        # torch's own advice (set weights_only=False) would be unsafe here: say what it is instead.
        kind = "holds code or objects, not plain data" if "weights_only" in str(exc) else "damaged"
        raise UserError(f"{path}: not a catdog-hpo checkpoint ({kind})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a catdog-hpo checkpoint (no {FORMAT!r} marker)")
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format_version {data.get('format_version')!r}; "
                        f"this catdog-hpo reads version {FORMAT_VERSION}")
    try:
        cfg = from_dict(TrialConfig, data["config"], where=f"{path}: config")
        return Checkpoint(
            state_dict=data["state_dict"], config=cfg, classes=tuple(data["classes"]),
            image_size=int(data["image_size"]), mean=list(data["mean"]), std=list(data["std"]),
            metrics=dict(data["metrics"]),
        )
    except KeyError as exc:
        raise UserError(f"{path}: damaged checkpoint (no {exc.args[0]!r} entry)") from None


def load_model(path: Path, device: torch.device) -> tuple[nn.Module, Checkpoint]:
    """The checkpoint's model with its weights, on ``device``, in eval mode."""
    ck = load_checkpoint(path)
    try:  # the checkpoint has every weight: the bare architecture takes them
        model = bare_model(ck.config.model, len(ck.classes), ck.image_size)
    except ConfigError as exc:
        raise UserError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(ck.state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit the model in its config ({first})") from None
    return model.to(device).eval(), ck


def bare_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """The architecture only (no ImageNet download, no weights file, nothing frozen): for weights
    that come next, from a checkpoint, a retrained seed or the search's own file."""
    arch = dataclasses.replace(cfg, pretrained=False, weights_file="", freeze_backbone=False)
    return build_model(arch, num_classes, image_size)
