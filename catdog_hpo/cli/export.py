"""`catdog-hpo export`: write the best (or a chosen) trial of a study to one file."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import STUDIES_DIR, add_storage_arg, add_study_arg, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write the best trial of a study to a config file (and print the retrain command)",
        description="Replay a completed trial's parameters through the study's search space and write "
        "the resolved config, its data source and split, metrics and package versions to one YAML or "
        "JSON file (by the --out extension). `catdog-hpo retrain --config FILE` reproduces the trial.",
    )
    add_study_arg(p, "the study to export from")
    add_storage_arg(p, "the store holding the study")
    p.add_argument("--trial", type=int, default=None, metavar="N",
                   help="trial number to export (default: the best completed trial; with several "
                   "objectives the most accurate trial on the Pareto front)")
    p.add_argument("--pareto", action="store_true",
                   help="pick from the Pareto front: the most accurate trial within --max-params/--max-latency")
    p.add_argument("--max-params", type=positive_int, default=None, metavar="N",
                   help="pick the most accurate completed trial with at most N parameters")
    p.add_argument("--max-latency", type=float, default=None, metavar="MS",
                   help="pick the most accurate completed trial with a latency of at most MS milliseconds")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="output .yaml/.yml/.json (default: studies/exports/<study>-trial<N>.yaml)")
    p.add_argument("--with-weights", action="store_true",
                   help="also copy the trial's own best-epoch weights (kept by run for its top trials) beside "
                   "the file, as FILE.weights.pt: `retrain --no-train` then ships them without training")
    p.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="with --with-weights: the --checkpoint-dir the study ran with (default: run's default)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.search.record import TrialRecord
    from catdog_hpo.errors import UserError
    from catdog_hpo.ship.trialfile import ExportSettings, export_trial

    picking = args.pareto or args.max_params is not None or args.max_latency is not None
    if args.trial is not None and picking:
        raise UserError("--trial N: give either a trial number or --pareto/--max-params/--max-latency, not both")
    if args.max_latency is not None and not args.max_latency > 0:
        raise UserError(f"--max-latency {args.max_latency}: must be more than 0 ms")
    done = export_trial(ExportSettings(study=args.study, storage=args.storage, trial=args.trial,
                                       out=args.out, studies_dir=STUDIES_DIR, pareto=args.pareto,
                                       max_params=args.max_params, max_latency=args.max_latency,
                                       with_weights=args.with_weights, checkpoint_dir=args.checkpoint_dir))
    t = done.trial
    epochs = TrialRecord.from_trial(t).epochs_run
    print(f"exported trial {t.number} of study {args.study!r} (val accuracy {t.values[0]:.4f}"
          + (f" after {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else "") + f") to {done.path}")
    print(f"picked: {done.rule}")
    print("reproduce it with:")
    print(f"  {done.command}")
    if args.with_weights:
        print(f"or ship the search's own weights of epoch {TrialRecord.from_trial(t).best_epoch} without training:")
        print(f"  {done.command} --no-train")
    return 0
