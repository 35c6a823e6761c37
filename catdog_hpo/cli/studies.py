"""`catdog-hpo studies`: the studies in a store, one line each; `studies delete` and `studies copy`."""

from __future__ import annotations

import argparse
import sys

from catdog_hpo.cli.common import add_storage_arg
from catdog_hpo.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("studies", help="list the studies in a store (or delete or copy one)",
                       description="List the studies in a store: sampler, search space, trials by "
                       "state, best value, start time. `studies delete NAME` and `studies copy NAME "
                       "--to URL` remove a study or copy it (with every trial) to another store.")
    add_storage_arg(p, "the store to list")
    p.add_argument("--json", action="store_true", help="print the list as one JSON document")
    p.set_defaults(handler=_handle)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=False)
    d = actions.add_parser("delete", help="delete a study and its trials from the store",
                           description="Delete study NAME and all its trials from --storage. Asks "
                           "first; without a terminal to ask on, needs --yes.")
    d.add_argument("name", metavar="NAME", help="the study to delete")
    d.add_argument("--yes", action="store_true", help="delete without asking")
    _add_own_storage(d)
    d.set_defaults(handler=_delete)
    c = actions.add_parser("copy", help="copy a study with all its trials to another store",
                           description="Copy study NAME, with its trials and attributes, from "
                           "--storage to the store --to URL (Optuna's copy_study), e.g. from a SQLite "
                           "file to a PostgreSQL server or a journal file.")
    c.add_argument("name", metavar="NAME", help="the study to copy")
    c.add_argument("--to", required=True, metavar="URL", help="the store to copy it into (created if new)")
    c.add_argument("--as", dest="as_name", default=None, metavar="NEW",
                   help="name of the copy (default: NAME)")
    _add_own_storage(c)
    c.set_defaults(handler=_copy)


def _add_own_storage(p: argparse.ArgumentParser) -> None:
    """--storage after the action too; SUPPRESS keeps a value given before the action."""
    add_storage_arg(p, "the store holding the study")
    for action in p._actions:  # argparse has no public way to change an added argument's default
        if action.dest == "storage":
            action.default = argparse.SUPPRESS


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.view.tables import format_study_summaries, study_summaries
    from catdog_hpo.search.storage import mask_password, open_storage

    rows = study_summaries(open_storage(args.storage, create=False))
    if args.json:
        from catdog_hpo.view.json_out import dumps, studies_document

        print(dumps(studies_document(rows, mask_password(args.storage))))
        return 0
    if not rows:
        print(f"no studies in {mask_password(args.storage)} yet: start one with `catdog-hpo run`")
        return 0
    print(format_study_summaries(rows))
    return 0


def _delete(args: argparse.Namespace) -> int:
    import optuna

    from catdog_hpo.search.storage import load_study, mask_password, open_storage

    shown = mask_password(args.storage)
    storage = open_storage(args.storage, create=False)
    study = load_study(storage, args.name, args.storage)
    n = len(study.get_trials(deepcopy=False))
    what = f"study {args.name!r} ({n} trial{'s' if n != 1 else ''}) from {shown}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"not deleting {what}: no terminal to confirm on; pass --yes to delete")
        answer = input(f"delete {what}? This cannot be undone. [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("not deleted")
            return 1
    from catdog_hpo.cli.common import STUDIES_DIR
    from catdog_hpo.search.artifacts import artifact_store, remove_study_artifacts

    # The trials' training-curve files live beside the store, not in it: remove them first.
    removed = remove_study_artifacts(study, artifact_store(STUDIES_DIR)) if (STUDIES_DIR / "artifacts").is_dir() else 0
    from catdog_hpo.search.checkpoints import remove_study_folder

    checkpoints = remove_study_folder(args.storage, args.name, STUDIES_DIR)  # where run keeps them by default
    optuna.delete_study(study_name=args.name, storage=storage)
    print(f"deleted {what}" + (f" and its {removed} artifact files" if removed else "")
          + (f" and {checkpoints} checkpoint files" if checkpoints else ""))
    return 0


def _copy(args: argparse.Namespace) -> int:
    import optuna

    from catdog_hpo.search.storage import load_study, mask_password, open_storage, study_names

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "[I ...] A new study created" line
    source = open_storage(args.storage, create=False)
    load_study(source, args.name, args.storage)  # an unknown name: the one-line error listing the studies
    target_name = args.as_name or args.name
    target = open_storage(args.to)
    if target_name in study_names(target):
        raise UserError(f"--to {mask_password(args.to)}: it already has a study named {target_name!r} "
                        "(pass --as NEW for another name, or delete that one first)")
    optuna.copy_study(from_study_name=args.name, from_storage=source, to_storage=target,
                      to_study_name=target_name)
    n = len(load_study(target, target_name, args.to).get_trials(deepcopy=False))
    print(f"copied study {args.name!r} ({n} trials) from {mask_password(args.storage)} to "
          f"{mask_password(args.to)} as {target_name!r}")
    return 0
