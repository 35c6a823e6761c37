"""A ``torch.export`` program (model.pt2): PyTorch's successor to TorchScript.

The file is ``torch.export.save``'s archive of the exported graph and weights, with a dynamic
batch axis, plus the same ``catdog_hpo.json`` metadata document the TorchScript file carries (an
extra file in the archive), so ``predict --model model.pt2`` needs nothing else. It loads with
``torch.export.load`` into plain PyTorch (no Python model code, no TorchScript), and is the input
AOTInductor and ExecuTorch compile from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from catdog_hpo.errors import UserError, first_line
from catdog_hpo.files import atomic_write
from catdog_hpo.ship.model_meta import TS_META_FILE, ModelMeta, cpu_copy

META_FILE = TS_META_FILE  # the same name and document as in the TorchScript file


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path, meta: ModelMeta) -> None:
    """Export ``model`` (CPU, eval) with ``torch.export`` and save it with the metadata."""
    model = cpu_copy(model)
    example = example.cpu().float()
    assert example.shape[0] >= 2, "a batch of 1 would let torch.export specialise the batch axis to 1"
    with torch.no_grad():
        program = torch.export.export(model, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    atomic_write(path, lambda tmp: torch.export.save(program, str(tmp), extra_files={META_FILE: meta.to_json()}),
                 keep_suffix=True)


def load_pt2(path: Path) -> tuple[nn.Module, ModelMeta]:
    """The saved program as a callable module (CPU) and its metadata; UserError if not one of ours."""
    extra = {META_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # a zip/format/version error of any kind: not a program we can run
        raise UserError(f"{path}: not a torch.export program ({first_line(exc)[:200]})") from None
    if not extra[META_FILE]:
        raise UserError(f"{path}: a torch.export program without catdog-hpo metadata ({META_FILE})")
    return program.module(), ModelMeta.from_json(extra[META_FILE], str(path))


def check_pt2(path: Path, model: nn.Module, batch: torch.Tensor) -> float:
    """Largest |logit difference| between the saved program and ``model`` on ``batch``."""
    module, _meta = load_pt2(path)
    with torch.no_grad():
        got = module(batch.cpu().float())
        want = cpu_copy(model)(batch.cpu().float())
    return float((got - want).abs().max())
