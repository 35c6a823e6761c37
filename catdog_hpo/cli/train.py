"""`catdog-hpo train`: train one config file, print a per-epoch table, save the best epoch."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from catdog_hpo.cli.common import STUDIES_DIR, add_data_args, add_device_arg, data_source, positive_int

_COLUMNS = ("epoch", "train loss", "val loss", "val acc", "seconds", "lr")
_ROW = "{:>5}  {:>10}  {:>8}  {:>7}  {:>7}  {:>9}"


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
    add_device_arg(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: studies/runs/<config file stem>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_handle)


def _format_row(stats) -> str:  # stats: catdog_hpo.engine.train.EpochStats
    return _ROW.format(stats.epoch, f"{stats.train_loss:.4f}", f"{stats.val_loss:.4f}",
                       f"{stats.val_acc:.4f}", f"{stats.seconds:.2f}", f"{stats.lr:.3g}")


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.config import load_trial_config, to_dict, write_mapping
    from catdog_hpo.engine.models import check_model, model_cost

    cfg = load_trial_config(args.config)
    train_overrides = {}
    if args.epochs is not None:
        train_overrides["epochs"] = args.epochs
    if args.seed is not None:
        train_overrides["seed"] = args.seed
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))
    check_model(cfg.model, cfg.image_size)  # before loading any data: a bad model fails fast
    out = args.out if args.out is not None else STUDIES_DIR / "runs" / args.config.stem
    source = data_source(args)

    from catdog_hpo.ship.checkpoint import save_checkpoint
    from catdog_hpo.data import load_images
    from catdog_hpo.engine.device import resolve_device
    from catdog_hpo.engine.train import fit

    device = resolve_device(args.device)
    data = load_images(source, cfg.image_size, STUDIES_DIR / "cache")
    cost = model_cost(cfg.model, len(data.classes), data.image_size)
    print(f"data: {source.describe()} ({len(data.train_y)} train / {len(data.val_y)} val images; "
          f"classes {', '.join(data.classes)}; {data.image_size} px)")
    print(f"model: {cfg.model.family}, {cost.params:,} parameters, {cost.flops / 1e6:,.1f} MFLOPs/image; "
          f"device: {device}")
    print(_ROW.format(*_COLUMNS))
    result = fit(cfg, data, device, on_epoch_end=lambda s: _print_row(_format_row(s)),
                 progress=not args.no_progress)

    history = [s.to_dict() for s in result.history]
    write_mapping(out / "history.json", {
        "status": result.status, "reason": result.reason, "best_epoch": result.best_epoch,
        "best_val_acc": result.best_val_acc, "history": history, "config": to_dict(cfg),
        "data": source.describe(), "data_fingerprint": data.fingerprint, "device": str(device),
    })
    if result.best_state is not None:
        best = result.history[result.best_epoch - 1]
        save_checkpoint(out / "best.pt", result.best_state, cfg, data.classes, {
            "best_epoch": result.best_epoch, "val_acc": best.val_acc, "val_loss": best.val_loss,
            "epochs_run": len(history), "history": history, "data": source.describe(),
            "data_fingerprint": data.fingerprint, "n_params": cost.params, "flops": cost.flops,
        })
        print(f"best epoch {result.best_epoch}: val acc {result.best_val_acc:.4f}; "
              f"saved {out / 'best.pt'} and {out / 'history.json'}")
    else:
        print(f"no epoch finished; nothing saved but {out / 'history.json'}")
    if result.status != "completed":
        print(f"catdog-hpo train: training stopped: {result.reason}", file=sys.stderr)
        return 1
    return 0


def _print_row(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # prints above an active progress bar instead of through it
