"""`catdog-hpo run`: the study around the objective.

Storage, samplers and pruners (registries whose keys are the CLI's choices), creating or
resuming a study, the trial budget shared by every worker on every machine, the grid, heartbeats,
interrupts, and the live progress output.

The budget: ``--trials N`` is the study's target of finished trials (COMPLETE + PRUNED). A worker
claims a trial under a study-wide lock only while finished + running < N, so any number of
workers and machines stop at exactly N (a failed trial frees its place). The grid: every grid
point is enqueued once when the study is created; workers pop them atomically, so no point runs
twice and none is left behind (Optuna's own GridSampler loses or repeats points in parallel).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

from catdog_hpo import __version__
from catdog_hpo.search import interrupts
from catdog_hpo.data import DataSource
from catdog_hpo.errors import UserError
from catdog_hpo.search.objective import Budget, ImageProvider, TrialFailed, run_trial
from catdog_hpo.search.spaces import Space, base_image_size, grid_points, load_space

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# Optuna marks heartbeats, grouped TPE and the retry callback "experimental", and warns that
# heartbeats are meant for Study.optimize (this module runs them itself, the same way). Neither
# warning tells a user anything they can act on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happened
_POLL_S = 1.0  # seconds between checks while waiting on other workers' trials
_MAX_FAILS_IN_A_ROW = 5  # a worker whose trials keep failing stops instead of burning the budget


# --------------------------------------------------------------------------- registries


def _tpe(seed: int | None, n_trials: int) -> optuna.samplers.BaseSampler:
    # Written out rather than left to the 5.0 defaults, so a seed means the same thing across
    # versions: multivariate TPE with groups (conditional spaces), constant liar for workers.
    startup = max(5, min(10, n_trials // 4))  # random trials before TPE models the space
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup, multivariate=True, group=True,
        constant_liar=True,
    )


SAMPLERS: dict[str, Callable[[int | None, int], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
    # The grid's points are enqueued trials (fixed params); this sampler never picks one.
    "grid": lambda seed, n: optuna.samplers.RandomSampler(seed=seed),
}

PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median": lambda epochs: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1),
    "sha": lambda epochs: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
    "hyperband": lambda epochs: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 2), reduction_factor=3),
    "patient": lambda epochs: optuna.pruners.PatientPruner(
        optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1), patience=2),
    "none": lambda epochs: optuna.pruners.NopPruner(),
}


@dataclass(frozen=True)
class RunSettings:
    study: str
    storage: str
    space: str  # built-in name or path
    sampler: str
    pruner: str
    trials: int
    data: DataSource
    timeout: float | None = None  # seconds for this process to start new trials
    epochs: int | None = None  # overrides the space's train.epochs
    workers: int = 1
    seed: int = 0
    devices: tuple[str, ...] = ("cpu",)  # one per worker (catdog_hpo.engine.device.assign_gpus)
    budget: Budget = field(default_factory=Budget)
    studies_dir: Path = Path("studies")
    heartbeat: int = 10  # seconds between heartbeats; a trial silent for 3x this is stale
    progress: bool = True


# --------------------------------------------------------------------------- storage and lock


def open_run_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    from catdog_hpo.search.storage import open_storage

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    return open_storage(
        url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
        # A trial whose worker died (SIGKILL, power loss) is failed by another worker and its
        # parameters run again, so the study still reaches N.
        heartbeat_stale_trial_callback=retry,
    )


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage, url: str, study_name: str) -> Iterator[None]:
    """A lock shared by every worker of the study: a file lock beside a SQLite file, an
    advisory lock on PostgreSQL, GET_LOCK on MySQL/MariaDB."""
    key = int(hashlib.sha256(study_name.encode()).hexdigest()[:15], 16)  # fits a signed bigint
    if url.startswith("sqlite:///"):
        from catdog_hpo.search.storage import file_lock

        with file_lock(Path(url[len("sqlite:///"):] + ".lock")):
            yield
        return
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name not in ("postgresql", "mysql", "mariadb"):
        with _LOCAL_LOCK:
            yield
        return
    import sqlalchemy

    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            unlock = ("SELECT pg_advisory_unlock(:k)", {"k": key})
        else:
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 600)"), {"k": f"catdog-{key}"})
            unlock = ("SELECT RELEASE_LOCK(:k)", {"k": f"catdog-{key}"})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text(unlock[0]), unlock[1])


_LOCAL_LOCK = threading.Lock()


# --------------------------------------------------------------------------- create or resume


def study_attrs(settings: RunSettings, space: Space, data_fingerprint: str) -> dict[str, Any]:
    return {
        "space": space.name,
        "space_fingerprint": space.fingerprint,
        "sampler": settings.sampler,
        "pruner": settings.pruner,
        "data": settings.data.describe(),
        "data_source": asdict(settings.data),  # all of it, so export/retrain rebuild the same split
        "data_fingerprint": data_fingerprint,
        "overrides": overrides_of(settings),  # dotted config paths fixed on top of the space
        "target_trials": settings.trials,
        "seed": settings.seed,
        "epochs": settings.epochs,
        "catdog_hpo_version": __version__,
    }


_STREAMS = "catdog_hpo:sampler_streams"  # study system attr: sampler streams handed out so far

# What must match for a rerun to continue a study (anything else would mix incomparable trials).
_MUST_MATCH = ("space_fingerprint", "sampler", "data", "data_fingerprint", "epochs")


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
                                    pruner=pruner, direction="maximize", load_if_exists=True)
        # Each sampler of the study draws its own stream, numbered under the lock: separate
        # machines (each one's worker 0), workers and resumed runs never repeat each other's
        # parameters, and a fresh study still replays exactly from --seed.
        stream = int(storage.get_study_system_attrs(study._study_id).get(_STREAMS, 0))
        storage.set_study_system_attr(study._study_id, _STREAMS, stream + 1)
        study.sampler = SAMPLERS[settings.sampler](settings.seed + 1_000_003 * stream, settings.trials)
        have = study.user_attrs
        if "space_fingerprint" not in have:  # new: enqueue the grid, then record what it is
            # A study left half-made by a crash in here has some points queued already.
            again = bool(study.get_trials(deepcopy=False))
            random.Random(settings.seed).shuffle(points)  # any prefix of the grid is spread out
            for params in points:
                study.enqueue_trial(params, skip_if_exists=again)
            if points:
                study.set_user_attr("grid_size", len(points))
            for key, value in sorted(wanted.items(), key=lambda kv: kv[0] == "space_fingerprint"):
                study.set_user_attr(key, value)  # the fingerprint last: it marks the study made
            return study, len(points)
    for key in _MUST_MATCH:
        if have.get(key) != wanted[key]:
            raise UserError(
                f"study {settings.study!r} was made with {key.replace('_', ' ')} {have.get(key)!r}, "
                f"this run has {wanted[key]!r}: pass another --study name to start a new study"
            )
    return study, int(have.get("grid_size", 0))


def _epochs_of(space: Space, settings: RunSettings) -> int:
    if settings.epochs is not None:
        return settings.epochs
    return int(space.base.get("train", {}).get("epochs", 10))


def overrides_of(settings: RunSettings) -> dict[str, Any]:
    """Dotted config paths the run fixes on top of the space (export replays these too)."""
    out: dict[str, Any] = {"train.seed": settings.seed}
    if settings.epochs is not None:
        out["train.epochs"] = settings.epochs
    return out


# --------------------------------------------------------------------------- the budget


def count(study: optuna.Study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials of the study."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return finished, running, waiting


def claim_trial(study: optuna.Study, storage: Any, settings: RunSettings, grid: int) -> optuna.Trial | str:
    """A new trial if the budget allows one now, else "done" or "wait" (others are running)."""
    if optuna.storages._heartbeat.is_heartbeat_enabled(storage):
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, retried
    with study_lock(storage, settings.storage, settings.study):
        finished, running, waiting = count(study)
        if finished >= settings.trials:
            return "done"
        if grid and waiting == 0:
            return "wait" if running else "done"  # the grid is exhausted once nothing runs
        if finished + running >= settings.trials:
            return "wait"  # a running trial may fail and free its place
        trial = study.ask()
        if optuna.storages._heartbeat.is_heartbeat_enabled(storage):
            # A heartbeat from the claim on: a worker that dies before its heartbeat thread
            # starts still leaves a trial that goes stale and is retried (Optuna never fails a
            # RUNNING trial with no heartbeat at all, and it would hold its place in the budget).
            storage.record_heartbeat(trial._trial_id)
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
    # The images first: bad data is reported before a store is created for nothing, and they are
    # decoded and cached once, so workers started after this only load the cache.
    images = ImageProvider(settings.data, settings.studies_dir / "cache", torch.device(device))
    fingerprint = images.get(base_image_size(space)).fingerprint
    storage = open_run_storage(settings.storage, settings.heartbeat)
    study, grid = create_or_resume(settings, storage, space, fingerprint)
    return Opened(space, storage, study, grid, images)


def work(settings: RunSettings, device: str, deadline: float | None,
         on_trial_end: Callable[[], None] | None = None, opened: Opened | None = None) -> None:
    """Claim and run trials until the study has its N (or the grid is done, or time is up)."""
    import torch

    from catdog_hpo.search.artifacts import artifact_store

    if device == "cpu" and settings.workers > 1:
        # Share the cores: K workers each running all-core OpenMP pools oversubscribe the CPU,
        # and spinning threads made steps 5-20x slower when measured on 2 cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    if opened is None:
        opened = open_study(settings, device)
    space, storage, study, grid, images = (opened.space, opened.storage, opened.study, opened.grid,
                                           opened.images)
    store = artifact_store(settings.studies_dir)
    overrides = overrides_of(settings)
    fails_in_a_row = 0
    while deadline is None or time.time() < deadline:
        interrupts.check()  # a signal that came during the last trial's store writes
        trial = claim_trial(study, storage, settings, grid)
        if trial == "done":
            return
        if trial == "wait":
            with interrupts.allowed():
                time.sleep(_POLL_S)
            continue
        # The heartbeat thread study.optimize runs too (ours is an ask/tell loop, for the budget).
        with optuna.storages._heartbeat.get_heartbeat_thread(trial._trial_id, storage):
            state = _run_one(study, trial, space, overrides, images, settings.budget, store)
        fails_in_a_row = fails_in_a_row + 1 if state == TrialState.FAIL else 0
        if on_trial_end is not None:
            on_trial_end()
        if fails_in_a_row >= _MAX_FAILS_IN_A_ROW:
            raise UserError(f"{fails_in_a_row} trials in a row failed; see the fail reasons with "
                            f"catdog-hpo show --study {settings.study}")


def _run_one(study: optuna.Study, trial: optuna.Trial, space: Space, overrides: dict[str, Any],
             images: ImageProvider, budget: Budget, store: Any) -> TrialState:
    """Run one claimed trial and tell the study how it ended; never leaves it RUNNING."""
    import torch

    try:
        value = run_trial(trial, space, overrides, images, budget, store)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    except (KeyboardInterrupt, interrupts.Terminated) as exc:
        # Not the trial's fault: fail it, and queue its parameters to run first on resume.
        # A second signal must not cut this short and leave the trial RUNNING.
        interrupts.ignore()
        trial.set_user_attr("fail_reason", "interrupted (SIGTERM)" if isinstance(exc, interrupts.Terminated)
                            else "interrupted (Ctrl-C)")
        study.tell(trial, state=TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise
    except torch.cuda.OutOfMemoryError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        _fail(study, trial, f"CUDA out of memory: {first}")
        del exc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the memory back before the next trial
        return TrialState.FAIL
    except TrialFailed as exc:
        _fail(study, trial, str(exc))
        return TrialState.FAIL
    except Exception as exc:  # a bug or a bad environment: record it, go on to the next trial
        _fail(study, trial, f"{type(exc).__name__}: {exc}")
        return TrialState.FAIL
    study.tell(trial, value)
    return TrialState.COMPLETE


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("fail_reason", reason.splitlines()[0][:500])
    study.tell(trial, state=TrialState.FAIL)


def _worker_main(settings: RunSettings, worker: int, device: str, deadline: float | None) -> None:
    """Entry point of a worker process (spawned: no CUDA state shared with the parent)."""
    interrupts.install()
    try:
        work(settings, device, deadline)
    except (KeyboardInterrupt, interrupts.Terminated):
        sys.exit(130)
    except UserError as exc:
        print(f"worker {worker}: error: {exc}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------- the run command


def run(settings: RunSettings) -> int:
    """Run (or resume) the study until it has ``settings.trials`` finished trials."""
    from catdog_hpo.search.progress import Progress
    from catdog_hpo.search.storage import mask_password

    # One worker runs in this process, on its device; K workers each open their own, and this
    # process only decodes the images for them (on the CPU) and polls the study.
    opened = open_study(settings, settings.devices[0] if settings.workers == 1 else "cpu")
    space, study, grid = opened.space, opened.study, opened.grid
    data = opened.images.get(base_image_size(space))
    target = min(settings.trials, grid) if grid else settings.trials
    where = mask_password(settings.storage)
    print(f"study {settings.study!r} in {where}: space {space.name}, sampler {settings.sampler}, "
          f"pruner {settings.pruner}, {len(data.train_y)} train / {len(data.val_y)} val images "
          f"of {len(data.classes)} classes ({', '.join(data.classes[:5])})")
    if grid:
        print(f"grid: {grid:,} points; this run stops after {target:,} of them"
              + (" (the whole grid)" if target == grid else f" (--trials {settings.trials})"))
    progress = Progress(study, target, enabled=settings.progress)
    deadline = time.time() + settings.timeout if settings.timeout else None
    # One worker runs here: signals wait for safe points. The parent of K workers only polls.
    previous = interrupts.install(allowed=settings.workers > 1)
    try:
        if settings.workers == 1:
            work(settings, settings.devices[0], deadline, on_trial_end=progress.poll, opened=opened)
        else:
            _run_workers(settings, deadline, progress)
    except (KeyboardInterrupt, interrupts.Terminated):
        progress.close()
        finished, _, _ = count(study)
        print(f"interrupted at {finished}/{target} finished trials; the running trial was closed and "
              f"will run first on resume. Resume with the same command.", file=sys.stderr)
        return 130
    finally:
        interrupts.restore(previous)
    progress.poll()
    progress.close()
    return _summary(study, target)


def _run_workers(settings: RunSettings, deadline: float | None, progress: Any) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(settings, i, settings.devices[i], deadline), daemon=False)
             for i in range(settings.workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            progress.poll()
            time.sleep(_POLL_S)
    except BaseException:
        for p in procs:  # pass the interrupt on so each worker closes its trial
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(timeout=60)
        raise
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise UserError(f"{len(bad)} of {len(procs)} workers exited with an error (codes {bad}); "
                        f"rerun the same command to resume")


def _summary(study: optuna.Study, target: int) -> int:
    finished, _, _ = count(study)
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not completed:
        print(f"done: {finished} finished trials, none completed", file=sys.stderr)
        return 1
    best = max(completed, key=lambda t: t.value if t.value is not None else -math.inf)
    print(f"done: {finished}/{target} finished trials; best: trial {best.number}, "
          f"val accuracy {best.value:.4f}")
    print(f"next: catdog-hpo export --study {study.study_name}")
    return 0
