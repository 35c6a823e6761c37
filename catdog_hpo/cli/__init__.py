"""The ``catdog-hpo`` command line: the only place that sees argparse.

Each subcommand lives in its own module here with two functions: ``add_parser(subparsers)``
declares its flags, and a handler turns the parsed flags into typed arguments and calls the
library. Heavy modules (torch, optuna, plotly, the dashboard) are imported inside the handlers,
so ``--help`` answers instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from catdog_hpo import __version__
from catdog_hpo.errors import UserError, install_warning_format

# Subcommand name -> module under catdog_hpo.cli; the order is the order of --help.
COMMANDS = {
    "run": "run",
    "train": "train",
    "studies": "studies",
    "show": "show",
    "export": "export",
    "retrain": "retrain",
    "predict": "predict",
    "dashboard": "dashboard",
    "report": "report",
    "storage-proxy": "storage_proxy",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catdog-hpo",
        description="Find a good CNN for an image-classification task with Optuna, watch the "
        "search, and export the winner as a model you can ship.",
    )
    parser.add_argument("--version", action="version", version=f"catdog-hpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f"catdog_hpo.cli.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given: run --config tells its flags from the file's
    install_warning_format()  # "warning: <message>", one line, no module path
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"catdog-hpo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"catdog-hpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
