"""`catdog-hpo run`: the study around the objective.

Storage (the sampler and pruner registries: ``search.samplers``), creating or resuming a study,
the trial budget shared by every worker on every machine, the grid, heartbeats, interrupts, the
live progress output and the summary. The loop each worker runs is ``search.worker``.

The budget: ``--trials N`` is the study's target of finished trials (COMPLETE + PRUNED). A worker
claims a trial under a study-wide lock only while finished + running < N, so any number of
workers and machines stop at exactly N (a failed trial frees its place). The grid: every grid
point is enqueued once when the study is created; workers pop them atomically, so no point runs
twice and none is left behind (Optuna's own GridSampler loses or repeats points in parallel).
"""

from __future__ import annotations

import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from catdog_hpo import __version__
from catdog_hpo.search import interrupts
from catdog_hpo.data import DataSource
from catdog_hpo.errors import UserError
from catdog_hpo.data.provider import ImageProvider
from catdog_hpo.search.objective import Budget, Goal
from catdog_hpo.search.objectives import directions
from catdog_hpo.search import optuna_compat
from catdog_hpo.search.budget import format_duration
from catdog_hpo.search.checkpoints import where as checkpoint_note
from catdog_hpo.search.locks import study_lock
from catdog_hpo.search.samplers import (MULTI_OBJECTIVE_PRUNERS, PRUNERS, SAMPLERS,
                                        SINGLE_OBJECTIVE_SAMPLERS)
from catdog_hpo.search.record import SAMPLER_STREAMS, StudyInfo, StudyKey, TrialKey
from catdog_hpo.search.space_files import base_image_size, check_installed, load_space
from catdog_hpo.search.spaces import Space, grid_points

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# Optuna marks heartbeats, grouped TPE and the retry callback "experimental", and warns that
# heartbeats are meant for Study.optimize (this module runs them itself, the same way). Neither
# warning tells a user anything they can act on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happened


@dataclass(frozen=True)
class RunSettings:
    study: str
    storage: str
    space: str  # built-in name or path
    sampler: str
    pruner: str
    trials: int | None  # None: as many as the time budget allows (needs time_budget)
    data: DataSource
    timeout: float | None = None  # seconds for this process to start new trials
    epochs: int | None = None  # overrides the space's train.epochs
    weights: str | None = None  # run --weights FILE: overrides model.weights_file (transfer families)
    workers: int = 1
    seed: int = 0
    devices: tuple[str, ...] = ("cpu",)  # one per worker (catdog_hpo.engine.device.assign_gpus)
    budget: Budget = field(default_factory=Budget)
    studies_dir: Path = Path("studies")
    heartbeat: int = 10  # seconds between heartbeats; a trial silent for 3x this is stale
    progress: bool = True
    objectives: tuple[str, ...] = ("accuracy",)  # search.objectives.OBJECTIVES keys, accuracy first
    latency_device: str = "cpu"  # where the latency objective is timed
    run_config: dict[str, Any] | None = None  # run --config FILE: {"path": ..., "values": {...}}
    deterministic: bool = False  # --deterministic: reproducible CUDA kernels (engine.runtime)
    time_budget: float | None = None  # run --budget: the study's wall-clock seconds (search.budget)
    baseline: bool = True  # enqueue the space's baseline config as trial 0 of a new study
    enqueue: tuple[dict[str, Any], ...] = ()  # run --enqueue FILE: params to run first (before the baseline)
    enqueue_from: str | None = None  # that FILE, recorded on its trials
    checkpoint_dir: Path | None = None  # --checkpoint-dir (None: beside a SQLite/journal file; search.checkpoints)
    checkpoint_every: int = 1  # --checkpoint-every: epochs between a trial's saved states (0: none)
    keep_weights: int = 3  # --keep-weights: completed trials whose best-epoch weights are kept


# --------------------------------------------------------------------------- storage


def open_run_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    from catdog_hpo.search.storage import open_storage

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    return open_storage(
        url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
        # A trial whose worker died (SIGKILL, power loss) is failed by another worker and its
        # parameters run again, so the study still reaches N.
        heartbeat_stale_trial_callback=retry,
    )


# --------------------------------------------------------------------------- create or resume


def study_attrs(settings: RunSettings, space: Space, data_fingerprint: str) -> dict[str, Any]:
    return {
        StudyKey.SPACE: space.name,
        StudyKey.SPACE_FINGERPRINT: space.fingerprint,
        StudyKey.SAMPLER: settings.sampler,
        StudyKey.PRUNER: settings.pruner,
        StudyKey.DATA: settings.data.describe(),
        StudyKey.DATA_SOURCE: asdict(settings.data),  # all of it, so export/retrain rebuild the same split
        StudyKey.DATA_FINGERPRINT: data_fingerprint,
        StudyKey.OVERRIDES: overrides_of(settings),  # dotted config paths fixed on top of the space
        StudyKey.TARGET_TRIALS: settings.trials,
        StudyKey.SEED: settings.seed,
        StudyKey.EPOCHS: settings.epochs,
        StudyKey.VERSION: __version__,
        StudyKey.OBJECTIVES: list(settings.objectives),
        StudyKey.LATENCY_DEVICE: settings.latency_device if "latency" in settings.objectives else None,
        StudyKey.SAMPLERS_USED: [settings.sampler],
        StudyKey.RUN_CONFIG: settings.run_config,
    }


# What must match for a rerun to continue a study (anything else would mix incomparable trials).
# The sampler may change (random start, then TPE): every sampler reads the same trials.
_MUST_MATCH = (StudyKey.SPACE_FINGERPRINT, StudyKey.DATA, StudyKey.DATA_FINGERPRINT, StudyKey.EPOCHS)


_OPEN_ENDED = 100  # the trial count samplers size their start-up phase by when only --budget bounds the study


def _enqueue_first(study: optuna.Study, settings: RunSettings, space: Space, again: bool) -> None:
    """A new study's first trials: the space's baseline (trial 0; not with the grid, whose points
    are the design, nor with --no-baseline), then the user's --enqueue configs."""
    if settings.baseline and space.baseline is not None and settings.sampler != "grid":
        study.enqueue_trial(space.baseline, user_attrs={TrialKey.BASELINE: True}, skip_if_exists=again)
    _enqueue_user(study, settings, skip_if_exists=again)


def _enqueue_user(study: optuna.Study, settings: RunSettings, skip_if_exists: bool) -> None:
    for params in settings.enqueue:
        study.enqueue_trial(params, user_attrs={TrialKey.ENQUEUED_FROM: settings.enqueue_from},
                            skip_if_exists=skip_if_exists)


def create_or_resume(settings: RunSettings, storage: optuna.storages.BaseStorage, space: Space,
                     data_fingerprint: str) -> tuple[optuna.Study, int]:
    """The study, created (with its grid enqueued) or reopened after checking it is the same
    search; returns it with the number of grid points (0 for other samplers)."""
    pruner = PRUNERS[settings.pruner](_epochs_of(space, settings))
    wanted = study_attrs(settings, space, data_fingerprint)
    # The grid is enumerated before the study exists: a refused grid (too large, a parameter
    # without grid values) must not leave a half-made study that a rerun would take for its own.
    points = grid_points(space) if settings.sampler == "grid" else []
    with study_lock(storage, settings.storage, settings.study):
        study = optuna.create_study(study_name=settings.study, storage=storage,
                                    pruner=pruner, directions=directions(settings.objectives),
                                    load_if_exists=True)
        # Each sampler of the study draws its own stream, numbered under the lock: separate
        # machines (each one's worker 0), workers and resumed runs never repeat each other's
        # parameters, and a fresh study still replays exactly from --seed.
        stream = optuna_compat.bump_study_counter(storage, study, SAMPLER_STREAMS)
        study.sampler = SAMPLERS[settings.sampler](settings.seed + 1_000_003 * stream, settings.trials or _OPEN_ENDED)
        have = study.user_attrs
        if StudyKey.SPACE_FINGERPRINT not in have:  # new: enqueue the grid, then record what it is
            # A study left half-made by a crash in here has some points queued already.
            again = bool(study.get_trials(deepcopy=False))
            random.Random(settings.seed).shuffle(points)  # any prefix of the grid is spread out
            _enqueue_first(study, settings, space, again)
            for params in points:
                study.enqueue_trial(params, skip_if_exists=again)
            if points:
                study.set_user_attr(StudyKey.GRID_SIZE, len(points))
            study.set_metric_names(list(settings.objectives))  # the dashboard's names for the values
            for key, value in sorted(wanted.items(), key=lambda kv: kv[0] == StudyKey.SPACE_FINGERPRINT):
                study.set_user_attr(key, value)  # the fingerprint last: it marks the study made
            return study, len(points)
    made_with = list(have.get(StudyKey.OBJECTIVES) or ["accuracy"])  # older studies: accuracy only
    if made_with != list(settings.objectives):
        raise UserError(f"study {settings.study!r} was made with --objectives {','.join(made_with)}, this run has "
                        f"{','.join(settings.objectives)}: pass another --study name to start a new study")
    for key in _MUST_MATCH:
        if have.get(key) != wanted[key]:
            raise UserError(
                f"study {settings.study!r} was made with {key.replace('_', ' ')} {have.get(key)!r}, "
                f"this run has {wanted[key]!r}: pass another --study name to start a new study"
            )
    _record_sampler(study, storage, settings, have)
    if settings.enqueue:  # a resumed study runs the user's --enqueue configs next (once each)
        with study_lock(storage, settings.storage, settings.study):
            _enqueue_user(study, settings, skip_if_exists=True)
    return study, int(have.get(StudyKey.GRID_SIZE, 0))


def _record_sampler(study: optuna.Study, storage: optuna.storages.BaseStorage, settings: RunSettings,
                    have: dict[str, Any]) -> None:
    """On resume: allow another sampler (not to or from the grid) and append it to the study's
    list of samplers used; record this run's --config file."""
    before = have.get(StudyKey.SAMPLER)
    if before is not None and before != settings.sampler and "grid" in (before, settings.sampler):
        # The grid is enqueued when the study is made and the budget counts its points.
        raise UserError(f"study {settings.study!r} was made with sampler {before!r}: a grid study cannot "
                        f"switch samplers, nor another study switch to the grid (run --sampler "
                        f"{settings.sampler} under another --study name)")
    with study_lock(storage, settings.storage, settings.study):
        attrs = study.user_attrs  # again, under the lock: another machine may have switched too
        used = list(attrs.get(StudyKey.SAMPLERS_USED) or ([before] if before else []))
        if not used or used[-1] != settings.sampler:
            study.set_user_attr(StudyKey.SAMPLERS_USED, used + [settings.sampler])
        if attrs.get(StudyKey.SAMPLER) != settings.sampler:
            study.set_user_attr(StudyKey.SAMPLER, settings.sampler)  # the sampler in use now
        if settings.run_config is not None and attrs.get(StudyKey.RUN_CONFIG) != settings.run_config:
            study.set_user_attr(StudyKey.RUN_CONFIG, settings.run_config)


def check_goal(sampler: str, pruner: str, objectives: tuple[str, ...]) -> None:
    """One-line UserError for a sampler or pruner that cannot serve these objectives."""
    if len(objectives) < 2:
        if pruner == "pareto":
            raise UserError("--pruner pareto: needs several objectives (e.g. --objectives accuracy,params)")
        return
    if sampler in SINGLE_OBJECTIVE_SAMPLERS:
        raise UserError(f"--objectives {','.join(objectives)} with --sampler {sampler}: "
                        f"{SINGLE_OBJECTIVE_SAMPLERS[sampler]} (use tpe, random or nsga2)")
    if pruner not in MULTI_OBJECTIVE_PRUNERS:
        raise UserError(f"--pruner {pruner} with --objectives {','.join(objectives)}: a multi-objective study "
                        f"prunes with {' or '.join(MULTI_OBJECTIVE_PRUNERS)} (see README: the Pareto rule)")


def goal_of(settings: RunSettings) -> Goal:
    """What each trial returns, and the Pareto pruning rule when the study has several objectives."""
    from catdog_hpo.search.pareto import ParetoRule

    rule = ParetoRule() if len(settings.objectives) > 1 and settings.pruner == "pareto" else None
    return Goal(objectives=settings.objectives, latency_device=settings.latency_device, rule=rule)


def _epochs_of(space: Space, settings: RunSettings) -> int:
    if settings.epochs is not None:
        return settings.epochs
    return int(space.base.get("train", {}).get("epochs", 10))


def overrides_of(settings: RunSettings) -> dict[str, Any]:
    """Dotted config paths the run fixes on top of the space (export replays these too)."""
    out: dict[str, Any] = {"train.seed": settings.seed}
    if settings.epochs is not None:
        out["train.epochs"] = settings.epochs
    if settings.weights is not None:
        out["model.weights_file"] = settings.weights
    return out


# --------------------------------------------------------------------------- the budget


def counts_toward_n(t: optuna.trial.FrozenTrial) -> bool:
    """A finished trial that trained (completed or pruned); a config turned away before
    training (search.objective.reject) does not use up --trials."""
    return t.state in FINISHED and TrialKey.REJECTED not in t.user_attrs


def count(study: optuna.Study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials of the study; finished: those that count toward N."""
    return tally(study.get_trials(deepcopy=False))


def tally(trials: list[optuna.trial.FrozenTrial]) -> tuple[int, int, int]:
    """(finished, running, waiting) of ``trials`` (count, on trials already read)."""
    finished = sum(counts_toward_n(t) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return finished, running, waiting


def claim_trial(study: optuna.Study, storage: Any, settings: RunSettings, grid: int,
                clock: Any = None) -> optuna.Trial | str:
    """A new trial if the budget allows one now, else "done" or "wait" (others are running).
    ``clock``: the study's time budget (search.budget.StudyClock); none left is "done"."""
    if clock is not None and clock.left() <= 0:
        return "done"
    if optuna_compat.heartbeat_enabled(storage):
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, retried
    with study_lock(storage, settings.storage, settings.study):
        finished, running, waiting = count(study)
        target = settings.trials if settings.trials is not None else math.inf
        if finished >= target:
            return "done"
        if grid and waiting == 0:
            return "wait" if running else "done"  # the grid is exhausted once nothing runs
        if finished + running >= target:
            return "wait"  # a running trial may fail and free its place
        trial = study.ask()
        if optuna_compat.heartbeat_enabled(storage):
            # A heartbeat from the claim on: a worker that dies before its heartbeat thread
            # starts still leaves a trial that goes stale and is retried (Optuna never fails a
            # RUNNING trial with no heartbeat at all, and it would hold its place in the budget).
            optuna_compat.record_heartbeat(storage, trial)
        return trial


# --------------------------------------------------------------------------- one worker


@dataclass
class Opened:
    """What a worker needs, opened once: the space, the store, the study and the images."""

    space: Space
    storage: Any
    study: optuna.Study
    grid: int  # grid points (0: not a grid study)
    images: ImageProvider


def open_study(settings: RunSettings, device: str) -> Opened:
    """Load the space and the images (on ``device``), then create or resume the study."""
    import torch

    space = load_space(settings.space)
    check_installed(space, overrides_of(settings))
    if settings.enqueue:  # the user's configs are points of this space, checked before anything runs
        from catdog_hpo.search.space_files import check_params

        for i, params in enumerate(settings.enqueue):
            check_params(space, params, f"--enqueue {settings.enqueue_from}" + (f" [{i}]" if len(settings.enqueue) > 1 else ""))
    # The images first: bad data is reported before a store is created for nothing, and they are
    # decoded and cached once, so workers started after this only load the cache.
    images = ImageProvider(settings.data, settings.studies_dir / "cache", torch.device(device))
    fingerprint = images.get(base_image_size(space)).fingerprint
    storage = open_run_storage(settings.storage, settings.heartbeat)
    study, grid = create_or_resume(settings, storage, space, fingerprint)
    return Opened(space, storage, study, grid, images)


# --------------------------------------------------------------------------- the run command


def run(settings: RunSettings) -> int:
    """Run (or resume) the study until it has ``settings.trials`` finished trials."""
    from catdog_hpo.search.progress import Progress
    from catdog_hpo.search.storage import mask_password
    from catdog_hpo.search.worker import WorkerRestart, run_workers, work  # the worker imports this module

    # One worker runs in this process, on its device; K workers each open their own, and this
    # process only decodes the images for them (on the CPU) and polls the study.
    check_goal(settings.sampler, settings.pruner, settings.objectives)
    opened = open_study(settings, settings.devices[0] if settings.workers == 1 else "cpu")
    space, study, grid = opened.space, opened.study, opened.grid
    data = opened.images.get(base_image_size(space))
    target = min(settings.trials or grid, grid) if grid else settings.trials
    where = mask_password(settings.storage)
    print(f"study {settings.study!r} in {where}: space {space.name}, sampler {settings.sampler}, "
          f"pruner {settings.pruner}, {len(data.train_y)} train / {len(data.val_y)} val images "
          f"of {len(data.classes)} classes ({', '.join(data.classes[:5])})")
    used = StudyInfo.from_study(study).samplers_used
    if len(set(used)) > 1:  # a resume switched samplers: say so, and what ran before
        print(f"sampler: this run uses {settings.sampler}; the study has used {' -> '.join(used)} "
              f"(recorded in its {StudyKey.SAMPLERS_USED!r} attribute)")
    note = checkpoint_note(settings.storage, settings.study, settings.studies_dir, settings.checkpoint_dir)
    if note and settings.checkpoint_every:  # a server store without --checkpoint-dir
        print(note)
    if grid:
        print(f"grid: {grid:,} points; this run stops after {target:,} of them"
              + (" (the whole grid)" if target == grid else f" (--trials {settings.trials})"))
    budget_s = _announce_budget(study, settings)
    progress = Progress(study, target, enabled=settings.progress, budget_s=budget_s)
    deadline = time.time() + settings.timeout if settings.timeout else None
    # One worker runs here: signals wait for safe points. The parent of K workers only polls.
    previous = interrupts.install(allowed=settings.workers > 1)
    try:
        if settings.workers == 1:
            work(settings, settings.devices[0], deadline, on_trial_end=progress.poll, opened=opened)
        else:
            run_workers(settings, deadline, progress)
    except WorkerRestart as exc:  # one in-process worker: its CUDA context is gone with it
        raise UserError(f"CUDA error ({exc}); {exc.fate}: rerun the same command "
                        "to resume in a fresh process") from None
    except (KeyboardInterrupt, interrupts.Terminated):
        progress.close()
        finished, _, _ = count(study)
        print(f"interrupted at {finished}/{target or '-'} finished trials; the running trial was closed and "
              f"will run first on resume. Resume with the same command.", file=sys.stderr)
        return 130
    finally:
        interrupts.restore(previous)
    progress.poll()
    progress.close()
    return _summary(study, target, since=progress.started)


def _announce_budget(study: optuna.Study, settings: RunSettings) -> float | None:
    """Store --budget on the study (or read the stored one) and say what is left."""
    from catdog_hpo.search.budget import format_duration, resolve_budget, spent_seconds

    budget_s = resolve_budget(study, settings.time_budget)
    if budget_s is not None:
        spent = spent_seconds(study)
        print(f"budget: {format_duration(budget_s)} of wall time for the study, {format_duration(spent)} spent, "
              f"{format_duration(max(0.0, budget_s - spent))} left; "
              + ("as many trials as fit" if settings.trials is None else f"at most {settings.trials} trials"))
    return budget_s


def _summary(study: optuna.Study, target: int | None, since: float | None = None) -> int:
    """The run's last lines; ``since``: when this run began, so its wall time counts in full."""
    finished, _, _ = count(study)
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not completed:
        print(f"done: {finished} finished trials, none completed", file=sys.stderr)
        return 1
    if len(study.directions) > 1:
        from catdog_hpo.search.pareto import front_trials

        front = front_trials(study)
        names = study.metric_names or [f"value {i}" for i in range(len(study.directions))]
        print(f"done: {finished}/{target} finished trials; Pareto front: {len(front)} trials "
              f"({', '.join(names)}): " + "; ".join(
                  f"#{t.number} " + " ".join(f"{v:.4g}" for v in t.values) for t in front[:5]))
        print(f"next: catdog-hpo report --study {study.study_name}   "
              f"catdog-hpo export --study {study.study_name} --pareto [--max-params N]")
        return 0
    from catdog_hpo.search.progress import study_pace

    best = max(completed, key=lambda t: t.value if t.value is not None else -math.inf)
    print(f"done: {finished}/{target or finished} finished trials; best: trial {best.number}, "
          f"val accuracy {best.value:.4f}{over_baseline(study, best.value)}")
    print(study_pace(study, since))
    print(f"next: catdog-hpo export --study {study.study_name}")
    return 0


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's baseline trial (the space's known-good config, trial 0 unless --no-baseline)."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(TrialKey.BASELINE):
            return t
    return None


def over_baseline(study: optuna.Study, value: float | None) -> str:
    """ " (+4.5 points over the baseline's 0.8100, trial 0)", or "" without a completed baseline."""
    base = baseline_trial(study)
    if value is None or base is None or base.state != TrialState.COMPLETE or base.value is None:
        return ""
    return f" ({100 * (value - base.value):+.1f} points over the baseline's {base.value:.4f}, trial {base.number})"
