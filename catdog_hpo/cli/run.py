"""`catdog-hpo run`: run or resume a study."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import STUDIES_DIR, add_data_args, add_device_arg, add_storage_arg, data_source, positive_int
from catdog_hpo.errors import UserError

SAMPLER_CHOICES = ("tpe", "random", "grid")  # catdog_hpo.search.study.SAMPLERS keys
PRUNER_CHOICES = ("median", "sha", "hyperband", "patient", "none")  # catdog_hpo.search.study.PRUNERS keys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run or resume a study (search for the best CNN)",
        description="Run an Optuna study: each trial trains one CNN and reports validation accuracy "
        "per epoch. Rerunning the same command resumes the study and stops at --trials in total.",
    )
    add_data_args(p)
    p.add_argument("--space", default="seed-cnn", metavar="NAME|PATH",
                   help="search space: seed-cnn, resnet18, quick, or a .yaml/.json/.py file (default: seed-cnn)")
    p.add_argument("--sampler", default="tpe", choices=SAMPLER_CHOICES, help="default: tpe")
    p.add_argument("--pruner", default="median", choices=PRUNER_CHOICES, help="default: median")
    p.add_argument("--trials", type=positive_int, default=20, metavar="N",
                   help="finished trials (completed + pruned) the study should have in total (default: 20)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="E", help="epochs per trial (default: the space's)")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: <space>-<sampler>-<data>)")
    add_storage_arg(p)
    p.add_argument("--workers", type=positive_int, default=1, metavar="K", help="worker processes on this machine (default: 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampler and training seed (default: 0)")
    add_device_arg(p)
    p.add_argument("--gpus", default=None, metavar="IDS", help="GPUs to spread workers over, e.g. 0,1 (default: all visible)")
    p.add_argument("--max-params", type=positive_int, default=None, metavar="N", help="turn away configs with more parameters")
    p.add_argument("--max-flops", type=positive_int, default=None, metavar="N", help="turn away configs with more forward FLOPs per image")
    p.add_argument("--heartbeat", type=positive_int, default=10, metavar="S",
                   help="seconds between trial heartbeats; a trial silent for 3x this is failed and retried (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (trial lines only)")
    p.set_defaults(handler=_handle)


def default_study_name(space: str, sampler: str, data_label: str) -> str:
    return f"{Path(space).stem}-{sampler}-{data_label}"


def _handle(args: argparse.Namespace) -> int:
    source = data_source(args)
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}: must be more than 0 seconds")
    from catdog_hpo.engine.device import assign_gpus, parse_gpus, resolve_device
    from catdog_hpo.search.objective import Budget
    from catdog_hpo.search.study import RunSettings, run

    device = resolve_device(args.device)
    if device.type == "cuda":
        import torch

        devices = assign_gpus(args.workers, parse_gpus(args.gpus, torch.cuda.device_count()))
    else:
        if args.gpus is not None:
            raise UserError(f"--gpus {args.gpus}: no GPU in use (--device {args.device})")
        devices = ["cpu"] * args.workers
    data_label = source.name if source.name is not None else Path(source.path).resolve().name
    settings = RunSettings(
        study=args.study or default_study_name(args.space, args.sampler, data_label),
        storage=args.storage, space=args.space, sampler=args.sampler, pruner=args.pruner,
        trials=args.trials, data=source, timeout=args.timeout, epochs=args.epochs,
        workers=args.workers, seed=args.seed, devices=tuple(devices),
        budget=Budget(max_params=args.max_params, max_flops=args.max_flops),
        studies_dir=STUDIES_DIR, heartbeat=args.heartbeat, progress=not args.no_progress,
    )
    return run(settings)
