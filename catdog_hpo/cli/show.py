"""`catdog-hpo show`: the best trials of a study as a table, every trial as CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import add_storage_arg, add_study_arg, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print the best trials of a study (and write every trial to CSV)",
                       description="Print a study's settings, its trials by state and its best "
                       "completed trials; --csv writes every trial with all its attributes.")
    add_study_arg(p, "the study to show")
    add_storage_arg(p, "the store holding the study")
    p.add_argument("--top", type=positive_int, default=10, metavar="N", help="how many trials to list (default: 10)")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE", help="also write every trial to FILE (CSV)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document instead of the table: settings, trials by state, the "
                   "--top best trials (the Pareto front with several objectives)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.view.trials_csv import write_trials_csv
    from catdog_hpo.view.tables import format_trials, study_header, top_trials
    from catdog_hpo.search.storage import load_study, open_storage

    study = load_study(open_storage(args.storage, create=False), args.study, args.storage)
    if args.json:
        from catdog_hpo.view.json_out import dumps, study_document

        from catdog_hpo.search.pareto import front_trials

        # front_trials, not Optuna's best_trials: the front of the study's own completed trials
        top = front_trials(study) if len(study.directions) > 1 else top_trials(study, args.top)
        if args.csv is not None:
            write_trials_csv(study, args.csv)  # stdout stays one JSON document
        print(dumps(study_document(study, top)))
        return 0
    print(study_header(study))
    print()
    if len(study.directions) > 1:  # several objectives: no single "best"; the front is the answer
        from catdog_hpo.view.pareto import format_front

        print(format_front(study))
    else:
        best = top_trials(study, args.top)
        print(format_trials(best) if best else "no completed trial yet")
    if args.csv is not None:
        print(f"\nwrote {len(study.get_trials(deepcopy=False))} trials to {write_trials_csv(study, args.csv)}")
    return 0
