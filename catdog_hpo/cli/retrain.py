"""`catdog-hpo retrain`: train the final model of a config or export file, save and export it."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import (STUDIES_DIR, add_data_args, add_deterministic_arg, add_device_arg, add_mlflow_args,
                                   data_source, positive_int)
from catdog_hpo.cli.weights import add_weights_arg, weights_file
from catdog_hpo.ship.choices import TRAIN_ON

TRAIN_ON_CHOICES = TRAIN_ON  # what ship.retrain accepts


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain", help="train the final model of an exported trial; save, evaluate and export it",
        description="Train the config in FILE (an export file, or any TrialConfig file) with the "
        "engine the search used, then write OUT/model.pt (checkpoint), OUT/metrics.json (val/test "
        "accuracy, per-class precision and recall, confusion matrix), OUT/curves.svg, and "
        "OUT/model.ts (TorchScript), OUT/model.onnx and OUT/model.pt2 (torch.export), each checked "
        "against PyTorch. The data default to the source and split recorded in the export file.",
        epilog="Exit status: 0 when everything was written; 1 when the checkpoint and metrics were "
        "written but an export (TorchScript, ONNX or torch.export) failed; 2 on bad input.",
    )
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="export or config file (YAML or JSON)")
    add_data_args(p, default_dataset=None)
    # None = the split recorded in the export file; with --data/--dataset, 0.2 and 0 as elsewhere.
    p.set_defaults(val_fraction=None, split_seed=None)
    for action in p._actions:  # argparse has no public way to reword an added argument's help
        if action.dest == "val_fraction":
            action.help = "with --data DIR: share held out for validation when DIR has no train/val split (default: 0.2)"
        elif action.dest == "dataset":
            action.help = "built-in dataset: synthetic, cifar10-catdog, oxford-pets (default: the export file's data)"
        elif action.dest == "split_seed":
            action.help = "with --data/--dataset: seed of that split (default: 0); without them the export's split is used"
    p.add_argument("--epochs", type=positive_int, metavar="E", help="override train.epochs (default: the config's)")
    p.add_argument("--seed", type=int, metavar="S", help="first seed (default: the config's train.seed)")
    add_weights_arg(p)
    p.add_argument("--seeds", type=positive_int, default=1, metavar="K",
                   help="train K times with seeds S, S+1, ...; report mean ± std, keep the best (default: 1)")
    p.add_argument("--train-on", choices=TRAIN_ON_CHOICES, default="train",
                   help="train: keep the best epoch by val accuracy; train+val: train on both and keep "
                   "the final epoch (val accuracy is then not held out) (default: train)")
    p.add_argument("--test", type=Path, default=None, metavar="DIR",
                   help="extra held-out images, DIR/<class>/*, with the model's class names")
    add_device_arg(p, "where to train and evaluate")
    add_deterministic_arg(p)
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: studies/models/<config file stem>)")
    p.add_argument("--no-export", action="store_true", help="skip the TorchScript, ONNX and torch.export exports")
    p.add_argument("--no-train", action="store_true",
                   help="do not train: ship the search's own weights that `export --with-weights` saved beside "
                   "FILE (evaluate, save, export, model card: the model the search measured, in seconds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mlflow_args(p, "a run with the model files, metrics.json and the model card")
    p.set_defaults(handler=_handle)


def _source(args: argparse.Namespace):  # -> DataSource | None
    """--data/--dataset, if given (with --val-fraction/--split-seed or their defaults); else None."""
    if args.data is None and args.dataset is None:
        if args.val_fraction is not None or args.split_seed is not None:
            from catdog_hpo.errors import UserError

            raise UserError("--val-fraction/--split-seed need --data DIR or --dataset NAME "
                            "(the export file's split is used otherwise)")
        return None
    args.val_fraction = 0.2 if args.val_fraction is None else args.val_fraction
    args.split_seed = 0 if args.split_seed is None else args.split_seed
    return data_source(args, default_dataset=None)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.search.tracking import tracking_uri

    mlflow = tracking_uri(args.mlflow, args.no_mlflow)  # a missing mlflow fails here, before training
    from catdog_hpo.ship.retrain import FORMATS, RetrainSettings, retrain

    settings = RetrainSettings(
        config=args.config, data=_source(args), epochs=args.epochs, seed=args.seed, seeds=args.seeds,
        weights=weights_file(args.weights),
        train_on=args.train_on, test_dir=args.test, device=args.device, out=args.out,
        studies_dir=STUDIES_DIR, formats=() if args.no_export else FORMATS, progress=not args.no_progress,
        deterministic=args.deterministic, no_train=args.no_train,
    )
    result = retrain(settings, log=_log)
    if mlflow is not None:
        from catdog_hpo.ship.retrain_tracking import log_retrain

        where = log_retrain(mlflow, result.out, args.config, result.metrics)
        if where is not None:
            print(f"mlflow: logged the model files, metrics.json and the model card to {where}")
    print(f"next: catdog-hpo predict --model {result.checkpoint} IMAGE|DIR ...")
    failed = [r for r in result.exports if not r.ok]
    return 1 if failed else 0


def _log(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # prints above an active progress bar instead of through it
