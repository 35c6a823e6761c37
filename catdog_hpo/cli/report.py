"""`catdog-hpo report`: one offline HTML report (and trials.csv) for a study."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import STUDIES_DIR, add_storage_arg, add_study_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML report and a trials CSV for a study",
        description="Write report.html (optimization history, per-epoch curves, parallel "
        "coordinates, importances, slices, top trials; opens with no network) and trials.csv.",
    )
    add_study_arg(p, "the study to report on")
    p.add_argument("--compare", nargs="+", default=[], metavar="NAME",
                   help="other studies in the same store to compare best-so-far with (e.g. grid random)")
    add_storage_arg(p, "the store holding the studies")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help=f"output folder (default: {STUDIES_DIR}/reports/<study>/)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.view.report import write_report
    from catdog_hpo.search.storage import open_storage

    storage = open_storage(args.storage, create=False)
    files = write_report(storage, args.study, compare=args.compare, out_dir=args.out, storage_url=args.storage)
    print(f"report: {files.html}\ntrials: {files.csv}")
    return 0
