"""`catdog-hpo studies`: the studies in a store, one line each."""

from __future__ import annotations

import argparse

from catdog_hpo.cli.common import add_storage_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("studies", help="list the studies in a store with their progress and best value",
                       description="List the studies in a store: sampler, search space, trials by "
                       "state, best value, start time.")
    add_storage_arg(p)
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.view.report import format_study_summaries, study_summaries
    from catdog_hpo.search.storage import mask_password, open_storage

    rows = study_summaries(open_storage(args.storage, create=False))
    if not rows:
        print(f"no studies in {mask_password(args.storage)} yet: start one with `catdog-hpo run`")
        return 0
    print(format_study_summaries(rows))
    return 0
