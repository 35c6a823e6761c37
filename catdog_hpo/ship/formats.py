"""Deployable copies of a trained model: TorchScript (model.ts), ONNX (model.onnx) and a
``torch.export`` program (model.pt2, see catdog_hpo.ship.pt2).

Both take what the network takes: float32 N x 3 x S x S, RGB, normalised as (x/255 - mean)/std,
with a dynamic batch axis, and give N x C logits. Each file carries what ``predict`` needs to
feed it (class names, image size, mean and std) as a JSON document named ``catdog_hpo``:
- ONNX: in the model's ``metadata_props`` (onnxruntime: ``get_modelmeta().custom_metadata_map``);
- TorchScript: as the extra file ``catdog_hpo.json`` (``torch.jit.load(..., _extra_files=...)``).
So each file is self-contained: no sidecar to lose.

``export_all`` writes both and checks each against the PyTorch model on a batch of real images,
reporting the largest absolute difference of the logits. A failure is a result, not an
exception: the caller's checkpoint is already safe on disk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from catdog_hpo.errors import UserError, first_line
from catdog_hpo.files import atomic_write
# What every file carries and is traced from lives in ship/model_meta.py, below this module and
# ship/pt2.py alike; imported here too, as the formats' own vocabulary.
from catdog_hpo.ship.model_meta import META_KEY, TS_META_FILE, ModelMeta, cpu_copy

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Largest |logit difference| an export may show against PyTorch on the check batch. float32
# kernels differ in summation order, which moves logits by ~1e-6..1e-5; a wrong graph moves them by >0.1.
PARITY_TOLERANCE = 1e-3
ONNX_OPSET = 18  # the dynamo exporter's default; onnxruntime >= 1.14 runs it


@dataclass(frozen=True)
class ExportResult:
    format: str  # "torchscript" | "onnx"
    path: Path
    ok: bool  # written and within PARITY_TOLERANCE of PyTorch
    max_abs_diff: float | None  # largest |logit difference| on the check batch; None if not checked
    error: str = ""  # one line: why it failed
    note: str = ""  # e.g. which ONNX exporter produced the file

    def line(self) -> str:
        """One line for the terminal."""
        if self.max_abs_diff is not None and self.ok:
            return (f"{self.format}: {self.path} (max |logit diff| vs PyTorch {self.max_abs_diff:.2e}"
                    f"{'; ' + self.note if self.note else ''})")
        return f"{self.format}: FAILED: {self.error}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.path) if self.ok else None, "ok": self.ok,
                "max_abs_diff": self.max_abs_diff, "error": self.error or None, "note": self.note or None}


# --------------------------------------------------------------------------- TorchScript


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, meta: ModelMeta) -> None:
    """Trace ``model`` (CPU, eval) on ``example`` and save it with the metadata as an extra file."""
    model = cpu_copy(model)
    with warnings.catch_warnings():
        # torch 2.10+ marks torch.jit as deprecated; it is still the format C++/LibTorch loads.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=Warning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example.cpu().float())
        atomic_write(path, lambda tmp: traced.save(str(tmp), _extra_files={TS_META_FILE: meta.to_json()}),
                     keep_suffix=True)


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, ModelMeta]:
    """A saved TorchScript model (CPU) and its metadata; UserError if it is not one of ours."""
    extra = {TS_META_FILE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=Warning)
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:  # a zip/pickle/format error of any kind: not a TorchScript file
            raise UserError(f"{path}: not a TorchScript model ({first_line(exc)[:200]})") from None
    if not extra[TS_META_FILE]:
        raise UserError(f"{path}: a TorchScript model without catdog-hpo metadata ({TS_META_FILE})")
    return module.eval(), ModelMeta.from_json(extra[TS_META_FILE], str(path))


# --------------------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: ModelMeta) -> str:
    """Export ``model`` to ONNX with a dynamic batch axis and the metadata; returns which exporter
    wrote it. The torch.export-based exporter (``dynamo=True``, needs onnxscript) comes first;
    the legacy TorchScript-based one is the fallback for models the new one cannot capture."""
    import onnx  # optional dependency (the "export" extra): ImportError is the caller's to report

    model = cpu_copy(model)
    example = example.cpu().float()
    assert example.shape[0] >= 2, "a batch of 1 would let torch.export specialise the batch axis to 1"

    def dynamo(tmp: Path) -> None:
        torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                          opset_version=ONNX_OPSET, external_data=False, verbose=False)

    def legacy(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": we know
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamo=False, opset_version=ONNX_OPSET,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})

    def write(tmp: Path, exporter: Callable[[Path], None]) -> None:
        with torch.no_grad():
            exporter(tmp)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, meta.to_json()
        proto.doc_string = f"catdog-hpo image classifier: {', '.join(meta.classes)}"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))

    try:
        atomic_write(path, lambda tmp: write(tmp, dynamo), keep_suffix=True)
        return "torch.export-based exporter"
    except Exception as first:  # the new exporter refuses some graphs; try the old one before giving up
        try:
            atomic_write(path, lambda tmp: write(tmp, legacy), keep_suffix=True)
        except Exception:
            raise first from None
        return f"legacy exporter (torch.export-based one failed: {first_line(first)[:120]})"


def onnx_session(path: Path) -> tuple[Any, ModelMeta]:
    """An onnxruntime CPU session for ``path`` and its metadata; UserError if not one of ours."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"{path}: reading ONNX needs onnxruntime, a dependency of catdog-hpo: "
                        "reinstall it (pip install -e .)") from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise UserError(f"{path}: not an ONNX model onnxruntime can load ({first_line(exc)[:200]})") from None
    props = session.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise UserError(f"{path}: an ONNX model without catdog-hpo metadata ({META_KEY!r} in metadata_props)")
    return session, ModelMeta.from_json(props[META_KEY], str(path))


# --------------------------------------------------------------------------- parity


def _reference_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cpu_copy(model)(batch.cpu().float())


def check_torchscript(path: Path, model: nn.Module, batch: torch.Tensor) -> float:
    """Largest |logit difference| between the saved TorchScript file and ``model`` on ``batch``."""
    module, _meta = load_torchscript(path)
    with torch.no_grad():
        got = module(batch.cpu().float())
    return float((got - _reference_logits(model, batch)).abs().max())


def check_onnx(path: Path, model: nn.Module, batch: torch.Tensor) -> float:
    """Largest |logit difference| between onnxruntime on the saved file and ``model`` on ``batch``."""
    session, _meta = onnx_session(path)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.cpu().float().numpy()})[0]
    return float((torch.from_numpy(got) - _reference_logits(model, batch)).abs().max())


def _export_one(fmt: str, path: Path, export: Callable[[], str | None],
                check: Callable[[], float], tolerance: float) -> ExportResult:
    try:
        note = export() or ""
    except ImportError as exc:
        return ExportResult(fmt, path, False, None, f"{exc.name or exc} is not installed "
                            "(a dependency of catdog-hpo: reinstall it, pip install -e .)")
    except Exception as exc:  # any exporter failure is reported, never fatal
        return ExportResult(fmt, path, False, None, f"export failed: {type(exc).__name__}: {first_line(exc)[:300]}")
    try:
        diff = check()
    except Exception as exc:
        return ExportResult(fmt, path, False, None, f"written to {path} but the check could not run it: "
                            f"{type(exc).__name__}: {first_line(exc)[:300]}", note)
    if not diff <= tolerance:  # NaN counts as a failure too
        return ExportResult(fmt, path, False, diff, f"{path}: logits differ from PyTorch by up to {diff:.3g} "
                            f"(> {tolerance:g}); do not ship this file", note)
    return ExportResult(fmt, path, True, diff, "", note)


def export_all(model: nn.Module, batch: torch.Tensor, out_dir: Path, meta: ModelMeta,
               formats: Sequence[str] = ("torchscript", "onnx"),
               tolerance: float = PARITY_TOLERANCE) -> list[ExportResult]:
    """Write ``out_dir/model.ts``, ``model.onnx`` and ``model.pt2`` (``formats``) and check each on ``batch``
    (float32 normalised images, at least 2). One result per format; nothing raises."""
    batch = batch.cpu().float()
    if batch.shape[0] < 2:
        batch = batch.repeat(2, 1, 1, 1)  # the ONNX trace needs a batch of 2+ to keep the axis dynamic
    results = []
    for fmt in formats:
        if fmt == "torchscript":
            path = Path(out_dir) / "model.ts"
            results.append(_export_one(fmt, path, lambda: export_torchscript(model, batch, path, meta),
                                       lambda: check_torchscript(path, model, batch), tolerance))
        elif fmt == "onnx":
            path = Path(out_dir) / "model.onnx"
            results.append(_export_one(fmt, path, lambda: export_onnx(model, batch, path, meta),
                                       lambda: check_onnx(path, model, batch), tolerance))
        elif fmt == "pt2":  # torch.export program (catdog_hpo.ship.pt2): TorchScript's successor
            from catdog_hpo.ship.pt2 import check_pt2, export_pt2

            path = Path(out_dir) / "model.pt2"
            results.append(_export_one(fmt, path, lambda: export_pt2(model, batch, path, meta),
                                       lambda: check_pt2(path, model, batch), tolerance))
        else:
            raise AssertionError(f"unknown export format {fmt!r}")
    return results
