"""`catdog-hpo train`: train one config file, print a per-epoch table, save the best epoch
(the work is ``ship.train_one``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from catdog_hpo.cli.common import STUDIES_DIR, add_data_args, add_deterministic_arg, add_device_arg, data_source, positive_int
from catdog_hpo.cli.weights import add_weights_arg, weights_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one config and save its best epoch",
        description="Train the model a config file describes (a TrialConfig YAML/JSON, or an "
        "export file) and save the best epoch's weights to OUT/best.pt, the curves to "
        "OUT/history.json.",
    )
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="config file (YAML or JSON)")
    add_data_args(p)
    p.add_argument("--epochs", type=positive_int, metavar="E", help="override train.epochs")
    p.add_argument("--seed", type=int, metavar="S", help="override train.seed")
    add_weights_arg(p)
    add_device_arg(p, "where to train")
    add_deterministic_arg(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: studies/runs/<config file stem>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.ship.train_one import TrainSettings, train_one

    run = train_one(TrainSettings(config=args.config, data=data_source(args), epochs=args.epochs, seed=args.seed,
                                  weights=weights_file(args.weights), device=args.device,
                                  deterministic=args.deterministic, out=args.out, studies_dir=STUDIES_DIR,
                                  progress=not args.no_progress), log=_print_row)
    if run.status != "completed":
        print(f"catdog-hpo train: training stopped: {run.reason}", file=sys.stderr)
        return 1
    return 0


def _print_row(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # prints above an active progress bar instead of through it
