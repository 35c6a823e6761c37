"""The study in its store: open the storage, create or resume the study, claim a trial.

Storage (the sampler and pruner registries: ``search.samplers``, ``search.pruners``), creating
or resuming a study (its attributes, the baseline, the grid, the configs a user asks to run first:
``--enqueue`` and ``search.warm_start``), heartbeats, and the
trial budget shared by every worker on every machine. The ``run`` command around it is
``search.run``; the loop each worker runs is ``search.worker``.

The budget: ``--trials N`` is the study's target of finished trials (COMPLETE + PRUNED). A worker
claims a trial under a study-wide lock only while finished + running < N, so any number of
workers and machines stop at exactly N (a failed trial frees its place). The grid: every grid
point is enqueued once when the study is created; workers pop them atomically, so no point runs
twice and none is left behind (Optuna's own GridSampler loses or repeats points in parallel).
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import optuna

from catdog_hpo import __version__
from catdog_hpo.data.provider import ImageProvider
from catdog_hpo.errors import UserError
from catdog_hpo.search import optuna_compat, warm_start
from catdog_hpo.search.locks import study_lock
from catdog_hpo.search.objectives import directions
from catdog_hpo.search.pruners import MULTI_OBJECTIVE_PRUNERS, PRUNERS
from catdog_hpo.search.record import SAME_SEARCH, SAMPLER_STREAMS, StudyKey, TrialKey, baseline_of, tally
from catdog_hpo.search.samplers import SAMPLERS, SINGLE_OBJECTIVE_SAMPLERS
from catdog_hpo.search.settings import RunSettings, overrides_of
from catdog_hpo.search.space_files import base_image_size, check_installed, load_space
from catdog_hpo.search.spaces import Space, grid_points

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from catdog_hpo.search.budget import StudyClock

# Optuna marks heartbeats, grouped TPE and the retry callback "experimental", and warns that
# heartbeats are meant for Study.optimize (this module runs them itself, the same way). Neither
# warning tells a user anything they can act on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happened


# --------------------------------------------------------------------------- storage


def open_run_storage(url: str, heartbeat: int) -> BaseStorage:
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


_OPEN_ENDED = 100  # the trial count samplers size their start-up phase by when only --budget bounds the study


def _enqueue_first(study: optuna.Study, settings: RunSettings, space: Space, again: bool,
                   warm: warm_start.Plan) -> None:
    """A new study's first trials: the space's baseline (trial 0; not with the grid, whose points
    are the design, nor with --no-baseline), then the configs the user asked for."""
    baseline = _baseline_of(settings, space)
    if baseline is not None:
        study.enqueue_trial(baseline, user_attrs={TrialKey.BASELINE: True}, skip_if_exists=again)
    _enqueue_user(study, settings, warm, skip_if_exists=again)


def _baseline_of(settings: RunSettings, space: Space) -> dict[str, Any] | None:
    """The config a new study runs as trial 0: the space's baseline, unless --no-baseline or the
    grid (whose points are the design)."""
    return space.baseline if settings.baseline and settings.sampler != "grid" else None


def _enqueue_user(study: optuna.Study, settings: RunSettings, warm: warm_start.Plan, skip_if_exists: bool) -> None:
    """The one queue of configs a user asks to run first: --warm-start's sources' best (right
    after the baseline), then the --enqueue file's; admission asks them only to finish in time."""
    asked = [*warm.queued, *((p, {TrialKey.ENQUEUED_FROM: settings.enqueue_from}) for p in settings.enqueue)]
    for params, attrs in asked:
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=skip_if_exists)


def _warm_plan(settings: RunSettings, space: Space, wanted: dict[str, Any], have: dict[str, Any],
               loaded: list[warm_start.Loaded]) -> warm_start.Plan:
    """What the loaded --warm-start sources not yet applied to the study (``have``: its
    attributes, read under the lock) give it."""
    done = set(have.get(StudyKey.WARM_STARTED_FROM) or ())
    todo = [src for src in loaded if src.source.label not in done]
    baseline = _baseline_of(settings, space)  # a source's best that is the baseline runs once
    return warm_start.plan(todo, space, settings.warm_start_top, wanted, [baseline] if baseline else [])


def create_or_resume(settings: RunSettings, storage: optuna.storages.BaseStorage, space: Space,
                     data_fingerprint: str, warm: list[warm_start.Loaded] | None = None) -> tuple[optuna.Study, int]:
    """The study, created (with its grid enqueued) or reopened after checking it is the same
    search; returns it with the number of grid points (0 for other samplers). ``warm``: the
    --warm-start sources not applied yet (warm_start.pending), read."""
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
            plan = _warm_plan(settings, space, wanted, have, warm or [])
            _enqueue_first(study, settings, space, again, plan)
            for params in points:
                study.enqueue_trial(params, skip_if_exists=again)
            warm_start.record(study, plan)  # after the queue: a history trial is no reason to skip a config
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
    for key in SAME_SEARCH:
        if have.get(key) != wanted[key]:
            raise UserError(
                f"study {settings.study!r} was made with {key.replace('_', ' ')} {have.get(key)!r}, "
                f"this run has {wanted[key]!r}: pass another --study name to start a new study"
            )
    _record_sampler(study, storage, settings, have)
    if settings.enqueue or warm:  # a resumed study runs the user's configs next (once each)
        with study_lock(storage, settings.storage, settings.study):
            plan = _warm_plan(settings, space, wanted, study.user_attrs, warm or [])
            _enqueue_user(study, settings, plan, skip_if_exists=True)
            warm_start.record(study, plan)
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


def _epochs_of(space: Space, settings: RunSettings) -> int:
    if settings.epochs is not None:
        return settings.epochs
    return int(space.base.get("train", {}).get("epochs", 10))


# --------------------------------------------------------------------------- the budget


def count(study: optuna.Study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials of the study; finished: those that count toward N."""
    return tally(study.get_trials(deepcopy=False))


class Claim(Enum):
    """What ``claim_trial`` answers when it hands out no trial."""

    DONE = "done"  # the study has its N, the grid is done, or the time budget is spent
    WAIT = "wait"  # running trials hold the last places: one may fail and free its place


def claim_trial(study: optuna.Study, storage: BaseStorage, settings: RunSettings, grid: int,
                clock: StudyClock | None = None) -> optuna.Trial | Claim:
    """A new trial if the budget allows one now, else Claim.DONE or Claim.WAIT (others are
    running). ``clock``: the study's time budget (search.budget.StudyClock); none left is DONE."""
    if clock is not None and clock.left() <= 0:
        return Claim.DONE
    if optuna_compat.heartbeat_enabled(storage):
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, retried
    with study_lock(storage, settings.storage, settings.study):
        finished, running, waiting = count(study)
        target = settings.trials if settings.trials is not None else math.inf
        if finished >= target:
            return Claim.DONE
        if grid and waiting == 0:
            return Claim.WAIT if running else Claim.DONE  # the grid is exhausted once nothing runs
        if finished + running >= target:
            return Claim.WAIT  # a running trial may fail and free its place
        trial = study.ask()
        if optuna_compat.heartbeat_enabled(storage):
            # A heartbeat from the claim on: a worker that dies before its heartbeat thread
            # starts still leaves a trial that goes stale and is retried (Optuna never fails a
            # RUNNING trial with no heartbeat at all, and it would hold its place in the budget).
            optuna_compat.record_heartbeat(storage, trial)
        return trial


# --------------------------------------------------------------------------- what a worker opens


@dataclass
class Opened:
    """What a worker needs, opened once: the space, the store, the study and the images."""

    space: Space
    storage: BaseStorage
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
    study, grid = create_or_resume(settings, storage, space, fingerprint, _warm_sources(settings, storage))
    return Opened(space, storage, study, grid, images)


def _warm_sources(settings: RunSettings, storage: BaseStorage) -> list[warm_start.Loaded]:
    """The --warm-start sources this study has not been warm-started from yet, read (a rerun or
    a spawned worker of the same command reads none)."""
    if not settings.warm_start:
        return []
    if settings.sampler == "grid":
        raise UserError("--warm-start with --sampler grid: a grid study runs its grid's points only, "
                        "so another study's configs have no place in it (use another sampler)")
    own = warm_start.WarmSource(settings.study, settings.storage)
    named = list(dict.fromkeys(settings.warm_start))  # a source named twice is read (and applied) once
    return [warm_start.load(src, own) for src in warm_start.pending(storage, settings.study, named)]


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's baseline trial (the space's known-good config, trial 0 unless --no-baseline;
    its latest attempt when it was retried)."""
    return baseline_of(study.get_trials(deepcopy=False))


