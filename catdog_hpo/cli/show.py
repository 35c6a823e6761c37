"""`catdog-hpo show`: the best trials of a study as a table, every trial as CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import add_storage_arg, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print the best trials of a study (and write every trial to CSV)",
                       description="Print a study's settings, its trials by state and its best "
                       "completed trials; --csv writes every trial with all its attributes.")
    p.add_argument("--study", required=True, metavar="NAME", help="the study to show")
    add_storage_arg(p)
    p.add_argument("--top", type=positive_int, default=10, metavar="N", help="how many trials to list (default: 10)")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE", help="also write every trial to FILE (CSV)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.view.report import format_trials, study_header, top_trials, write_trials_csv
    from catdog_hpo.search.storage import load_study, open_storage

    study = load_study(open_storage(args.storage, create=False), args.study, args.storage)
    print(study_header(study))
    best = top_trials(study, args.top)
    print()
    print(format_trials(best) if best else "no completed trial yet")
    if args.csv is not None:
        print(f"\nwrote {len(study.get_trials(deepcopy=False))} trials to {write_trials_csv(study, args.csv)}")
    return 0
