"""`catdog-hpo predict`: class and probability per image, from a checkpoint, TorchScript or ONNX.

Images are decoded by the data layer's own decoder (``catdog_hpo.data.decode``: EXIF
orientation, RGB conversion, centre square, bilinear resize to the model's size) and normalised
with the model's recorded mean and std by training's own ``augment.normalize``, so predict sees
exactly what training saw. ``evaluate`` (used by ``retrain``) runs the same path on labelled images.

Model files (by extension):
  .pt / .pth  a catdog-hpo checkpoint (``checkpoint.load_model``: torch.load(weights_only=True))
  .onnx       an ONNX file from retrain: class names, image size and normalisation are in its
              metadata_props under "catdog_hpo" (see ``formats``); run with onnxruntime on the CPU
  .ts         a TorchScript file from retrain (the same metadata as an extra file)
  .pt2        a torch.export program from retrain (the same metadata as an extra file)

Test-time flip averaging (``augment.tta``): the exported files hold it in their graph (their
metadata says ``tta``); a checkpoint holds the plain network, and its config's ``augment.tta``
wraps it here (``engine.tta``), so every kind predicts the same.

A file that cannot be read or decoded is reported on its own row (``error``) and the rest go on.
``predict`` returns the rows; the CLI exits 0 when at least one image was predicted, else 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from catdog_hpo.data.decode import IMAGE_EXTENSIONS, decode_files
from catdog_hpo.engine.augment import normalize  # the one normalisation, training's own
from catdog_hpo.errors import UserError
from catdog_hpo.ship.model_meta import ModelMeta

MODEL_SUFFIXES = {".pt": "checkpoint", ".pth": "checkpoint", ".onnx": "onnx", ".ts": "torchscript",
                  ".pt2": "pt2"}
BATCH = 256  # images per forward pass: few launches, bounded activation memory (~1 GB for ResNet-18 at 224 px)
DECODE_CHUNK = 512  # images decoded at once: bounds the pixel memory of a big folder


@dataclass(frozen=True)
class Predictor:
    kind: str  # "checkpoint" | "torchscript" | "onnx"
    path: Path
    meta: ModelMeta
    device: torch.device  # where the float batches go (the CPU for ONNX)
    forward: Callable[[torch.Tensor], torch.Tensor]  # normalised float N x 3 x S x S -> logits (CPU)


@dataclass(frozen=True)
class Prediction:
    image: str  # the path as given or found
    label: str | None = None  # predicted class name
    probability: float | None = None  # softmax probability of that class, 0..1
    probabilities: dict[str, float] | None = None  # every class
    error: str | None = None  # why this image has no prediction

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "class": self.label, "probability": self.probability,
                "probabilities": self.probabilities}


# --------------------------------------------------------------------------- models


def load_predictor(path: Path, device: torch.device) -> Predictor:
    """The model at ``path`` ready to run; UserError for a missing file or another file type."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--model {path}: no such file")
    if path.is_dir():
        raise UserError(f"--model {path}: is a folder; give model.pt, model.onnx, model.pt2 or model.ts inside it")
    kind = MODEL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"--model {path}: unknown model file type {path.suffix or '(no extension)'!r}; "
                        f"expected {', '.join(MODEL_SUFFIXES)}")
    return _LOADERS[kind](path, device)


def _torch_forward(module: Callable[[torch.Tensor], torch.Tensor], device: torch.device
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Float32 CPU logits of a PyTorch-run model (checkpoint, TorchScript, pt2) on ``device``."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.to(device)).float().cpu()

    return forward


def _checkpoint_predictor(path: Path, device: torch.device) -> Predictor:
    import zipfile

    from catdog_hpo.ship.checkpoint import load_model

    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; say so plainly for anything else
        raise UserError(f"--model {path}: not a catdog-hpo checkpoint (not a PyTorch zip archive)")
    from catdog_hpo.engine.tta import with_tta

    model, ck = load_model(path, device)
    tta = ck.config.augment.tta  # the checkpoint holds the plain network: flip averaging comes from the config
    meta = ModelMeta(classes=ck.classes, image_size=ck.image_size, mean=tuple(ck.mean), std=tuple(ck.std), tta=tta)

    return Predictor("checkpoint", path, meta, device, _torch_forward(with_tta(model, tta), device))


def _torchscript_predictor(path: Path, device: torch.device) -> Predictor:
    from catdog_hpo.ship.formats import load_torchscript

    module, meta = load_torchscript(path)
    module = module.to(device)

    return Predictor("torchscript", path, meta, device, _torch_forward(module, device))


def _onnx_predictor(path: Path, device: torch.device) -> Predictor:
    from catdog_hpo.ship.formats import INPUT_NAME, OUTPUT_NAME, onnx_session

    session, meta = onnx_session(path)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    return Predictor("onnx", path, meta, torch.device("cpu"), forward)


def _pt2_predictor(path: Path, device: torch.device) -> Predictor:
    from catdog_hpo.ship.pt2 import load_pt2

    module, meta = load_pt2(path)
    module = module.to(device)

    return Predictor("pt2", path, meta, device, _torch_forward(module, device))


_LOADERS: dict[str, Callable[[Path, torch.device], Predictor]] = {
    "checkpoint": _checkpoint_predictor,
    "torchscript": _torchscript_predictor,
    "onnx": _onnx_predictor,
    "pt2": _pt2_predictor,
}


# --------------------------------------------------------------------------- tensors


def batched_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, meta: ModelMeta,
                   device: torch.device, batch: int = BATCH) -> torch.Tensor:
    """Logits (CPU, float32, N x C) of uint8 images ``x`` (N x 3 x S x S), ``batch`` at a time."""
    outs = [forward(normalize(x[i:i + batch].to(device), meta.mean, meta.std)) for i in range(0, x.shape[0], batch)]
    # one copy to the host at the end (a forward may leave its logits on the device)
    return torch.cat(outs).cpu() if outs else torch.empty(0, len(meta.classes))


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, meta: ModelMeta,
             device: torch.device) -> dict[str, Any]:
    """classification_report of ``model`` (float32, eval mode) on uint8 images ``x``: the
    images go through the same batching and normalisation as ``predict``'s."""
    from catdog_hpo.engine.metrics import classification_report

    model = model.to(device).eval()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(batch).float()  # stays on the device: no sync per batch

    preds = batched_logits(forward, x, meta, device).argmax(1)
    return classification_report(preds, y.cpu(), meta.classes)


# --------------------------------------------------------------------------- images


def find_images(inputs: Sequence[Path]) -> list[tuple[Path, str | None]]:
    """Each input file as given; each folder's image files (recursive, sorted, hidden ones skipped).
    A missing path or a folder without images comes back with the reason instead."""
    found: list[tuple[Path, str | None]] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files = _images_under(item)
            found.extend((f, None) for f in files)
            if not files:
                exts = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
                found.append((item, f"a folder with no images ({exts})"))
        elif item.exists():
            found.append((item, None))  # named explicitly: try it whatever its extension
        else:
            found.append((item, "no such file or folder"))
    return found


def _images_under(folder: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(Path(dirpath, n) for n in filenames
                   if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(out)


def predict(predictor: Predictor, inputs: Sequence[Path]) -> list[Prediction]:
    """One Prediction per image found in ``inputs`` (in order); unreadable ones carry an error."""
    found = find_images(inputs)
    results: list[Prediction] = []
    for start in range(0, len(found), DECODE_CHUNK):
        results.extend(_predict_chunk(predictor, found[start:start + DECODE_CHUNK]))
    return results


def _predict_chunk(predictor: Predictor, found: list[tuple[Path, str | None]]) -> list[Prediction]:
    meta = predictor.meta
    todo = [i for i, (_, err) in enumerate(found) if err is None]
    pixels, reasons = decode_files([found[i][0] for i in todo], meta.image_size)
    errors: dict[int, str] = {i: err for i, (_, err) in enumerate(found) if err is not None}
    errors.update({todo[j]: r for j, r in enumerate(reasons) if r is not None})
    good = [j for j, r in enumerate(reasons) if r is None]
    probs = torch.empty(0, len(meta.classes))
    if good:
        x = torch.from_numpy(pixels[good]).permute(0, 3, 1, 2).contiguous()  # N x S x S x 3 -> N x 3 x S x S
        probs = torch.softmax(batched_logits(predictor.forward, x, meta, predictor.device), dim=1)
    row_of = {todo[j]: k for k, j in enumerate(good)}
    out: list[Prediction] = []
    for i, (path, _) in enumerate(found):
        if i in errors:
            out.append(Prediction(str(path), error=errors[i]))
            continue
        p = probs[row_of[i]]
        best = int(p.argmax())
        out.append(Prediction(str(path), meta.classes[best], float(p[best]),
                              {c: float(v) for c, v in zip(meta.classes, p.tolist())}))
    return out


# --------------------------------------------------------------------------- output


def format_table(rows: Sequence[Prediction]) -> str:
    """Aligned text: image, class, probability (or the error)."""
    width = max([len("image")] + [len(r.image) for r in rows])
    cls_width = max([len("class")] + [len(r.label or "") for r in rows])
    lines = [f"{'image':<{width}}  {'class':<{cls_width}}  probability"]
    for r in rows:
        if r.error is not None:
            lines.append(f"{r.image:<{width}}  {'-':<{cls_width}}  error: {r.error}")
        else:
            lines.append(f"{r.image:<{width}}  {r.label:<{cls_width}}  {r.probability:.4f}")
    return "\n".join(lines)


def json_lines(rows: Sequence[Prediction]) -> str:
    """One JSON object per image and line (``image`` and ``class``/``probability``/``probabilities``, or ``error``)."""
    return "\n".join(json.dumps(r.to_dict()) for r in rows)
