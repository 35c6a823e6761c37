"""One worker of `catdog-hpo run`: claim a trial, run it, tell the study how it ended, again.

``work`` is the loop (in the run's own process with one worker, in a spawned process each with
more: ``run_workers``). It stops when the study has its N, the grid is done, the time budget
fits no more trials, the guards keep turning the sampler's configs away, or trials keep failing.
A trial never stays RUNNING: an interrupt fails it and queues its parameters to run first on
resume; a sticky CUDA error (one the probe confirms) does the same, once per trial, and asks for
a fresh worker process (RESTART_EXIT); the retry goes on from the trial's last saved epoch
(``search.checkpoints``), which every worker tidies after each trial. Workers sharing a GPU each get 1/K of its memory and hand
their cached memory back after every trial.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.trial import TrialState

from catdog_hpo.engine.device import classify_cuda_error, cuda_context_works, free_device_memory
from catdog_hpo.errors import UserError
from catdog_hpo.data.provider import ImageProvider
from catdog_hpo.search import admission, checkpoints, interrupts, optuna_compat
from catdog_hpo.search.budget import Guard, Plan, StudyClock, resolve_budget
from catdog_hpo.search.limits import Limits
from catdog_hpo.search.pruners import EXPECTED_EPOCHS
from catdog_hpo.search.flat import flat
from catdog_hpo.search.record import TrialKey, counts_toward_n, outcome, retry_attrs
from catdog_hpo.search.settings import RunSettings, goal_of, overrides_of
from catdog_hpo.search.spaces import Space
from catdog_hpo.search.study import Claim, Opened, claim_trial, open_study
from catdog_hpo.search.tracking import TrialRuns
from catdog_hpo.search.trial import EpochHook, Goal, TrialFailed, run_trial

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from optuna.artifacts import FileSystemArtifactStore

    from catdog_hpo.search.progress import Progress

_POLL_S = 1.0  # seconds between checks while waiting on other workers' trials
_MAX_FAILS_IN_A_ROW = 5  # a worker whose trials keep failing stops instead of burning the budget


def work(settings: RunSettings, device: str, deadline: float | None,
         on_trial_end: Callable[[], None] | None = None, opened: Opened | None = None) -> None:
    """Claim and run trials until the study has its N (or the grid is done, or time is up)."""
    import torch

    from catdog_hpo.search.artifacts import artifact_store

    from catdog_hpo.engine.runtime import configure_process

    if device == "cpu" and settings.workers > 1:
        # Share the cores: K workers each running all-core OpenMP pools oversubscribe the CPU,
        # and spinning threads made steps 5-20x slower when measured on 2 cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    # TF32, determinism; a CUDA worker sharing its GPU gets its memory share and 1-2 CPU threads
    from catdog_hpo.engine.device import device_label

    sharing = _workers_on_gpu(settings, device_label(torch.device(device)))  # a pinned worker's own GPU
    configure_process(device, deterministic=settings.deterministic, workers_on_gpu=max(1, sharing))
    if opened is None:
        opened = open_study(settings, device)
    if sharing > 1:  # the other image sizes wait in host memory, not in this worker's share
        opened.images.keep_on_device(1)
    space, storage, study, grid, images = (opened.space, opened.storage, opened.study, opened.grid,
                                           opened.images)
    store = artifact_store(settings.studies_dir)
    ckpts = checkpoints.for_run(settings.storage, settings.study, settings.studies_dir, settings.checkpoint_dir,
                                settings.checkpoint_every, settings.keep_weights)
    overrides = overrides_of(settings)
    clock, guard = _budget_guard(settings, study, device)
    tracked = TrialRuns(settings.mlflow, study)  # MLflow child runs (does nothing without --mlflow)
    if tracked.active:  # a dead worker's trial this worker fails at a claim: its run ends FAILED too
        optuna_compat.also_on_stale(storage, tracked.failed_as_stale)
    fails_in_a_row = 0
    while deadline is None or time.time() < deadline:
        interrupts.check()  # a signal that came during the last trial's store writes
        trial = claim_trial(study, storage, settings, grid, clock)
        if trial is Claim.DONE:
            return
        if trial is Claim.WAIT:
            with interrupts.allowed():
                time.sleep(_POLL_S)
            continue
        # The heartbeat thread study.optimize runs too (ours is an ask/tell loop, for the budget).
        tracked.started(trial)
        try:
            with optuna_compat.heartbeat_thread(trial, storage):
                state = _run_one(study, trial, space, overrides, images, settings.limits, store, goal_of(settings),
                                 guard, ckpts, on_epoch=tracked.epoch)
        finally:
            tracked.ended(trial)  # its state as told, however it ended
        ckpts.tidy(study)  # the finished trial's checkpoint; weights that fell out of the top
        _release_memory(trial.number)  # cached blocks back to the driver: a neighbour's trial may need them
        fails_in_a_row = fails_in_a_row + 1 if state == TrialState.FAIL else 0
        rejected = trial.user_attrs.get(TrialKey.REJECTED) if state == TrialState.PRUNED else None
        guard.refusals.count(refused=bool(rejected))
        if on_trial_end is not None:
            on_trial_end()
        reason = admission.stop(guard.refusals, clock.left(), last=rejected)
        if not reason and settings.stop_when_flat and TrialKey.CONFIG in trial.user_attrs:
            reason = _flat(study, images, trial.user_attrs[TrialKey.CONFIG]["image_size"])
        if reason:  # the budget is done, or the sampler keeps proposing configs the guards refuse
            print(f"stopping: {reason}", file=sys.stderr)
            return
        if fails_in_a_row >= _MAX_FAILS_IN_A_ROW:
            raise UserError(f"{fails_in_a_row} trials in a row failed; see the fail reasons with "
                            f"catdog-hpo show --study {settings.study}")


def _flat(study: optuna.Study, images: ImageProvider, image_size: int) -> str | None:
    """--stop-when-flat's verdict (search.flat) on the study's finished trials, in finishing order."""
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                   if counts_toward_n(t)), key=lambda t: t.datetime_complete or t.datetime_start)
    values = [t.value if outcome(t) == "COMPLETE" else None for t in done]
    return flat(values, len(images.get(image_size).val_y))


def _budget_guard(settings: RunSettings, study: optuna.Study, device: str) -> tuple[StudyClock, Guard]:
    """This worker's clock on the study's time budget and its cost-model guard."""
    import torch

    clock = StudyClock(study, resolve_budget(study, settings.time_budget))
    plan = Plan(trials=settings.trials, workers=settings.workers, expected_epochs=EXPECTED_EPOCHS[settings.pruner])
    return clock, Guard(study, clock, plan, torch.device(device))


def _run_one(study: optuna.Study, trial: optuna.Trial, space: Space, overrides: dict[str, Any],
             images: ImageProvider, limits: Limits, store: FileSystemArtifactStore, goal: Goal = Goal(),
             guard: Guard | None = None, ckpts: checkpoints.Checkpoints | None = None,
             on_epoch: EpochHook | None = None) -> TrialState:
    """Run one claimed trial and tell the study how it ended; never leaves it RUNNING.
    WorkerRestart after a sticky CUDA error (the trial failed and, unless it was a retry
    already, its parameters queued again)."""
    try:
        value = run_trial(trial, space, overrides, images, limits, store, goal, guard, ckpts, on_epoch)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    except (KeyboardInterrupt, interrupts.Terminated) as exc:
        # Not the trial's fault: fail it, and queue its parameters to run again on resume (after
        # the configs queued before it: the baseline, --enqueue, --warm-start), origin kept.
        # A second signal must not cut this short and leave the trial RUNNING.
        interrupts.ignore()
        trial.set_user_attr(TrialKey.FAIL_REASON, "interrupted (SIGTERM)" if isinstance(exc, interrupts.Terminated)
                            else "interrupted (Ctrl-C)")
        study.tell(trial, state=TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs=retry_attrs(trial))
        raise
    except TrialFailed as exc:
        _fail(study, trial, str(exc))
        return TrialState.FAIL
    except Exception as exc:  # out of memory, a CUDA error, a bug: record it, go on (or restart)
        kind = classify_cuda_error(exc)
        first = _first_line(exc)
        # Before any other CUDA call: on a broken context empty_cache() itself raises. The probe
        # is guarded; a context that still runs a kernel had an error of this config only.
        sticky = kind == "sticky" and cuda_context_works(images.device) is not True
        _fail(study, trial, f"CUDA out of memory: {first}" if kind == "oom" else f"{type(exc).__name__}: {exc}")
        del exc  # its traceback holds the trial's frames
        if sticky:
            # Every later trial in this process would fail: a fresh worker process takes over,
            # and runs the parameters first. A retry is not queued again: a config that breaks
            # the context twice would kill every fresh worker until the restarts run out.
            queued = bool(trial.params) and TrialKey.RETRY_OF not in trial.user_attrs
            if queued:
                study.enqueue_trial(trial.params, user_attrs=retry_attrs(trial))
            raise WorkerRestart(first, queued)
        return TrialState.FAIL
    study.tell(trial, value)
    return TrialState.COMPLETE


class WorkerRestart(Exception):
    """A sticky CUDA error: the worker process must exit and a fresh one take its place."""

    def __init__(self, message: str, queued: bool = False) -> None:
        super().__init__(message)
        self.queued = queued  # the trial's parameters run again first

    @property
    def fate(self) -> str:
        """What became of the trial, for the one-line messages."""
        return "its trial is queued again" if self.queued else "its trial is not queued again"


def _release_memory(number: int) -> None:
    """Between trials: free the process's cached device memory. A context broken by an error
    not known as sticky fails here, and the worker restarts instead of dying (exit 1)."""
    try:
        free_device_memory()
    except Exception as exc:  # only CUDA raises here
        raise WorkerRestart(f"after trial {number}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


RESTART_EXIT = 75  # a worker's exit code asking the parent for a fresh process (EX_TEMPFAIL)
_MAX_RESTARTS = 3  # per worker slot: a GPU that keeps failing stops the run instead


def _workers_on_gpu(settings: RunSettings, device: str) -> int:
    """Workers of this run on ``device``'s GPU, this one included (0 on the CPU)."""
    return 0 if device == "cpu" else settings.devices.count(device)


def _shares_gpu(settings: RunSettings, device: str) -> bool:
    """More than one worker of this run on ``device``'s GPU (always False on the CPU)."""
    return _workers_on_gpu(settings, device) > 1


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(TrialKey.FAIL_REASON, reason.splitlines()[0][:500])
    study.tell(trial, state=TrialState.FAIL)


def _worker_main(settings: RunSettings, worker: int, device: str, deadline: float | None) -> None:
    """Entry point of a worker process (spawned: no CUDA state shared with the parent)."""
    from catdog_hpo.errors import install_warning_format

    from catdog_hpo.engine.device import pin_worker_device

    install_warning_format()  # as in the parent CLI: one "warning: ..." line
    # Before any CUDA call: this process sees only its GPU (as cuda:0), so it never opens a
    # context on another one; workers sharing a GPU get expandable allocator segments.
    shared = _shares_gpu(settings, device)
    device = pin_worker_device(device, shared)
    interrupts.install()
    try:
        work(settings, device, deadline)
    except (KeyboardInterrupt, interrupts.Terminated):
        sys.exit(130)
    except WorkerRestart as exc:
        print(f"worker {worker}: CUDA error ({exc}); {exc.fate} and a new worker process takes over",
              file=sys.stderr)
        sys.exit(RESTART_EXIT)
    except UserError as exc:
        print(f"worker {worker}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def run_workers(settings: RunSettings, deadline: float | None, progress: Progress) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def start(i: int) -> BaseProcess:
        p = ctx.Process(target=_worker_main, args=(settings, i, settings.devices[i], deadline), daemon=False)
        p.start()
        return p

    procs = [start(i) for i in range(settings.workers)]
    restarts = [0] * settings.workers
    try:
        while True:
            for i, p in enumerate(procs):  # a worker whose CUDA context broke: a fresh process
                if p.exitcode == RESTART_EXIT and restarts[i] < _MAX_RESTARTS:
                    restarts[i] += 1
                    procs[i] = start(i)
            if not any(p.is_alive() for p in procs):
                break
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
