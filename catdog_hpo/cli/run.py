"""`catdog-hpo run`: run or resume a study."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.cli.common import (STUDIES_DIR, add_data_args, add_deterministic_arg, add_device_arg, add_mlflow_args,
                                   add_storage_arg, data_source, positive_int)
from catdog_hpo.cli.weights import add_weights_arg, weights_file
from catdog_hpo.errors import UserError
from catdog_hpo.search import choices

SAMPLER_CHOICES = choices.SAMPLERS  # the keys of catdog_hpo.search.samplers.SAMPLERS
PRUNER_CHOICES = choices.PRUNERS  # the keys of catdog_hpo.search.pruners.PRUNERS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run or resume a study (search for the best CNN)",
        description="Run an Optuna study: each trial trains one CNN and reports validation accuracy "
        "per epoch. Rerunning the same command resumes the study and stops at --trials in total.",
    )
    add_data_args(p)
    p.add_argument("--space", default="seed-cnn", metavar="NAME|PATH",
                   help="search space: seed-cnn, resnet18, transfer, quick, or a .yaml/.json/.py file (default: seed-cnn)")
    p.add_argument("--sampler", default="tpe", choices=SAMPLER_CHOICES,
                   help="tpe (Optuna's TPE), random, grid (the space's grid), gp (Gaussian process), cmaes "
                   "(CMA-ES), qmc (Sobol sequence), nsga2 (several --objectives); a resumed study may "
                   "switch, except to or from grid (default: tpe)")
    p.add_argument("--pruner", default=None, choices=PRUNER_CHOICES,
                   help="sha (ASHA, the default), median, hyperband, patient, none; pareto with several "
                   "--objectives (the cost-aware rule, see README)")
    p.add_argument("--objectives", default="accuracy", metavar="LIST",
                   help="what to optimise, accuracy first: accuracy (default) or e.g. accuracy,params; "
                   "costs: params, flops, latency (minimised)")
    p.add_argument("--latency-device", default="cpu", choices=("cpu", "cuda"),
                   help="where the latency objective is timed: batch-1 forward, median of repeats (default: cpu)")
    p.add_argument("--trials", "--n-trials", dest="trials", type=positive_int, default=None, metavar="N",
                   help="finished trials (completed + pruned; configs turned away before training do not count) "
                   "the study should have in total (default: 20; with --budget: as many as fit)")
    p.add_argument("--budget", default=None, metavar="DURATION",
                   help="the study's wall-clock budget (90s, 45m, 2h or seconds), across all runs, workers and "
                   "machines: a resumed run spends what is left; configs the cost model says will not fit are "
                   "turned away before training")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not run the space's baseline config as trial 0 of a new study")
    p.add_argument("--enqueue", type=Path, default=None, metavar="FILE",
                   help="YAML/JSON parameters (one mapping, a list, or an export file) to run first")
    p.add_argument("--warm-start", action="append", default=None, metavar="STUDY[@STORAGE]",
                   help="start from an earlier study (in --storage, or in STORAGE): its best configs run first, "
                   "and its trials are the sampler's history when it searched the same space and data; "
                   "may be given several times (docs/warm-start.md)")
    p.add_argument("--warm-start-top", type=positive_int, default=choices.WARM_START_TOP, metavar="K",
                   help=f"configs each --warm-start study gives (default: {choices.WARM_START_TOP})")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--stop-when-flat", action="store_true",
                   help="end the study once as many trials have completed without beating its best by more than the "
                   "validation noise as before it (docs/budget.md)")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="E", help="epochs per trial (default: the space's)")
    p.add_argument("--study", "--study-name", dest="study", default=None, metavar="NAME",
                   help="study name (default: <space>-<sampler>-<data>)")
    add_storage_arg(p, "where the study is kept (created if new)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="K", help="worker processes on this machine (default: 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampler and training seed (default: 0)")
    add_weights_arg(p)
    add_device_arg(p, "where each trial trains (with --workers K on a GPU box, see --gpus)")
    add_deterministic_arg(p)
    p.add_argument("--gpus", default=None, metavar="IDS", help="GPUs to spread workers over, e.g. 0,1 (default: all visible)")
    p.add_argument("--max-params", type=positive_int, default=None, metavar="N", help="turn away configs with more parameters")
    p.add_argument("--max-flops", type=positive_int, default=None, metavar="N",
                   help="turn away configs with more FLOPs per image as shipped (both forwards with augment.tta)")
    p.add_argument("--heartbeat", type=positive_int, default=10, metavar="S",
                   help="seconds between trial heartbeats; a trial silent for 3x this is failed and retried (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (trial lines only)")
    g = p.add_argument_group("checkpoints (an interrupted trial's retry goes on from its last saved epoch)")
    g.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="where trials save their training state, on storage every worker reads (default: "
                   "beside a SQLite or journal file; give it for PostgreSQL/MySQL studies on several machines)")
    g.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="epochs between a trial's saved states; 0: none (default: 1, every epoch)")
    g.add_argument("--keep-weights", type=int, default=3, metavar="K",
                   help="keep the best-epoch weights of the K most accurate trials, for export --with-weights "
                   "(default: 3; 0: none)")
    add_mlflow_args(p, "the study as a parent run, each trial a child run with its per-epoch metrics")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="YAML file whose keys are these flags (trials: 50, max-params: 1000000, ...); "
                   "flags on the command line override it; the study and its exports record it")
    p.set_defaults(handler=_handle)
    global _PARSER
    _PARSER = p


DEFAULT_TRIALS = 20  # --trials without --budget
_PARSER: argparse.ArgumentParser | None = None  # run's own parser: --config re-reads the command line


def default_study_name(space: str, sampler: str, data_label: str, objectives: tuple[str, ...] = ("accuracy",)) -> str:
    # Several objectives: "-vs-params" etc., so it never resumes the single-objective study.
    costs = "".join(f"-vs-{name}" for name in objectives[1:])
    return f"{Path(space).stem}-{sampler}-{data_label}{costs}"


def _handle(args: argparse.Namespace) -> int:
    run_config = None
    if args.config is not None:
        from catdog_hpo.cli.config_file import apply_config_file

        assert _PARSER is not None
        argv = list(getattr(args, "argv", None) or [])
        own = argv[argv.index("run") + 1:] if "run" in argv else argv
        run_config = apply_config_file(_PARSER, args, own, args.config)
    from catdog_hpo.search.objectives import parse_objectives

    objectives = parse_objectives(args.objectives)
    # ASHA by default: at equal budget it finished 3x the trials of median/patient on the photos
    # with the same best (bench/pruners.py, bench/README.md)
    pruner = args.pruner or ("pareto" if len(objectives) > 1 else "sha")
    from catdog_hpo.search.study import check_goal

    check_goal(args.sampler, pruner, objectives)  # before any data is loaded
    if args.stop_when_flat and len(objectives) > 1:
        raise UserError(f"--stop-when-flat with --objectives {args.objectives}: it watches one objective's "
                        "best value (a Pareto front has none); use it with --objectives accuracy")
    if "latency" in objectives and args.latency_device == "cuda":
        from catdog_hpo.engine.device import resolve_device

        try:
            resolve_device("cuda")
        except UserError:
            raise UserError("--latency-device cuda: no CUDA GPU is available here (use --latency-device cpu)") from None
    from catdog_hpo.search.tracking import tracking_uri

    mlflow = tracking_uri(args.mlflow, args.no_mlflow)  # a missing mlflow fails here, before any data
    source = data_source(args)
    from catdog_hpo.search.durations import parse_duration
    from catdog_hpo.search.checkpoints import check_flags

    check_flags(args.checkpoint_every, args.keep_weights, args.checkpoint_dir)

    time_budget = parse_duration(args.budget) if args.budget is not None else None
    trials = args.trials if args.trials is not None or time_budget is not None else DEFAULT_TRIALS
    enqueue: tuple = ()
    if args.enqueue is not None:
        from catdog_hpo.search.space_files import read_params_file

        enqueue = read_params_file(args.enqueue)
    warm_start: tuple = ()
    if args.warm_start:
        from catdog_hpo.search.warm_start import parse_source

        warm_start = tuple(parse_source(text, args.storage) for text in args.warm_start)
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}: must be more than 0 seconds")
    from catdog_hpo.engine.device import assign_gpus, parse_gpus, resolve_device
    from catdog_hpo.search.limits import Limits
    from catdog_hpo.search.run import run
    from catdog_hpo.search.settings import RunSettings

    device = resolve_device(args.device)
    if device.type == "cuda":
        import torch

        if device.index is not None:  # --device cuda:N: every worker on GPU N
            if args.gpus is not None:
                raise UserError(f"--device {args.device} and --gpus {args.gpus}: give one of them "
                                "(--gpus spreads workers over several GPUs)")
            gpus = [device.index]
        else:
            gpus = parse_gpus(args.gpus, torch.cuda.device_count())
        devices = assign_gpus(args.workers, gpus)
    else:
        if args.gpus is not None:
            raise UserError(f"--gpus {args.gpus}: no GPU in use (--device {args.device})")
        devices = ["cpu"] * args.workers
    data_label = source.name if source.name is not None else Path(source.path).resolve().name
    settings = RunSettings(
        study=args.study or default_study_name(args.space, args.sampler, data_label, objectives),
        storage=args.storage, space=args.space, sampler=args.sampler, pruner=pruner,
        trials=trials, data=source, timeout=args.timeout, epochs=args.epochs,
        time_budget=time_budget, baseline=not args.no_baseline, enqueue=enqueue,
        enqueue_from=str(args.enqueue) if args.enqueue is not None else None,
        warm_start=warm_start, warm_start_top=args.warm_start_top,
        weights=weights_file(args.weights), workers=args.workers, seed=args.seed, devices=tuple(devices),
        limits=Limits(max_params=args.max_params, max_flops=args.max_flops),
        studies_dir=STUDIES_DIR, heartbeat=args.heartbeat, progress=not args.no_progress,
        deterministic=args.deterministic,
        objectives=objectives, latency_device=args.latency_device, run_config=run_config,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, keep_weights=args.keep_weights,
        mlflow=mlflow, stop_when_flat=args.stop_when_flat,
    )
    return run(settings)
