"""`catdog-hpo dashboard`: watch a study live in optuna-dashboard."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import STUDIES_DIR, add_storage_arg

DEFAULT_ARTIFACTS = STUDIES_DIR / "artifacts"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard",
        help="serve optuna-dashboard on the study store (live charts, trials, training curves)",
        description="Serve optuna-dashboard on the study store. It reads while `catdog-hpo run` "
        "writes, so open it during a search. It has no login: keep it on 127.0.0.1.",
    )
    add_storage_arg(p, "the store to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8080, help="port, 0 = any free one (default: 8080)")
    p.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, metavar="DIR",
                   help=f"artifact folder with the training curves (default: {DEFAULT_ARTIFACTS})")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.view.dashboard import serve_dashboard

    serve_dashboard(args.storage, args.artifacts, host=args.host, port=args.port)
    return 0
