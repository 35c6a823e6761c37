"""`catdog-hpo predict` (not written yet)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="(not written yet)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    raise NotImplementedError("predict")
