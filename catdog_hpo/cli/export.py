"""`catdog-hpo export`: write the best (or a chosen) trial of a study to one file."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import STUDIES_DIR, add_storage_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write the best trial of a study to a config file (and print the retrain command)",
        description="Replay a completed trial's parameters through the study's search space and write "
        "the resolved config, its data source and split, metrics and package versions to one YAML or "
        "JSON file (by the --out extension). `catdog-hpo retrain --config FILE` reproduces the trial.",
    )
    p.add_argument("--study", required=True, metavar="NAME", help="the study to export from")
    add_storage_arg(p)
    p.add_argument("--trial", type=int, default=None, metavar="N",
                   help="trial number to export (default: the best completed trial)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="output .yaml/.yml/.json (default: studies/exports/<study>-trial<N>.yaml)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.ship.trialfile import ExportSettings, export_trial

    done = export_trial(ExportSettings(study=args.study, storage=args.storage, trial=args.trial,
                                       out=args.out, studies_dir=STUDIES_DIR))
    t = done.trial
    epochs = t.user_attrs.get("epochs_run")
    print(f"exported trial {t.number} of study {args.study!r} (val accuracy {t.value:.4f}"
          + (f" after {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else "") + f") to {done.path}")
    print("reproduce it with:")
    print(f"  {done.command}")
    return 0
