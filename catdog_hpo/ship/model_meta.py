"""What every model file carries and is traced from: the ``catdog_hpo`` metadata document
(``ModelMeta``: how to feed the network) and the float32 CPU copy each export is made of.

Below ``ship.formats`` (TorchScript, ONNX, ``export_all``) and ``ship.pt2`` (the ``torch.export``
program), which both write and read it; ``ship.predict`` reads it back from any of them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
from torch import nn

from catdog_hpo import __version__
from catdog_hpo.errors import UserError
from catdog_hpo.ship.checkpoint import FORMAT_VERSION as CHECKPOINT_FORMAT_VERSION

META_KEY = "catdog_hpo"  # ONNX metadata_props key / TorchScript extra file stem
TS_META_FILE = f"{META_KEY}.json"
MODEL_FORMAT = "catdog-hpo-model"


@dataclass(frozen=True)
class ModelMeta:
    """How to feed the exported network: everything ``predict`` needs besides the weights."""

    classes: tuple[str, ...]
    image_size: int  # px, square
    mean: tuple[float, ...]  # per channel, [0, 1] scale
    std: tuple[float, ...]
    tta: bool = False  # the model averages the logits of each image and its mirror (augment.tta; engine/tta.py)

    def to_json(self) -> str:
        return json.dumps({
            "format": MODEL_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "input": f"float32 N x 3 x {self.image_size} x {self.image_size}, RGB, (x/255 - mean)/std",
            "output": f"float32 N x {len(self.classes)} logits, in the order of classes"
                      + (", averaged over each image and its horizontal mirror" if self.tta else ""),
            "tta": self.tta,
            "catdog_hpo_version": __version__,
        })

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> ModelMeta:
        """Parse the metadata (as a file's extra entry holds it: text or UTF-8 bytes); another
        format or version, or a damaged document -> UserError."""
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        try:
            data = json.loads(text)
        except ValueError:
            raise UserError(f"{where}: its {META_KEY!r} metadata is not valid JSON") from None
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise UserError(f"{where}: not a catdog-hpo model (no {MODEL_FORMAT!r} metadata)")
        if data.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise UserError(f"{where}: model format_version {data.get('format_version')!r}; "
                            f"this catdog-hpo reads version {CHECKPOINT_FORMAT_VERSION}")
        try:
            return cls(classes=tuple(str(c) for c in data["classes"]), image_size=int(data["image_size"]),
                       mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
                       tta=bool(data.get("tta", False)))  # absent in files from before augment.tta
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: damaged catdog-hpo metadata ({type(exc).__name__}: {exc})") from None


def cpu_copy(model: nn.Module) -> nn.Module:
    """A float32, contiguous-layout, eval-mode copy on the CPU: what the exports are traced from."""
    m = copy.deepcopy(model).to("cpu", dtype=torch.float32)
    return m.to(memory_format=torch.contiguous_format).eval()
