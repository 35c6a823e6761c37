"""``catdog-hpo run``: open the study, say what it is, run its workers, sum it up.

One worker runs in this process (``search.worker.work``), or K spawned worker processes
(``search.worker.run_workers``) while this one polls the store for the progress lines. The store
(create, resume, claim) is ``search.study``; the time budget ``search.budget``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from catdog_hpo.errors import UserError
from catdog_hpo.search import interrupts
from catdog_hpo.search.budget import resolve_budget, spent_seconds
from catdog_hpo.search.durations import format_duration
from catdog_hpo.search.checkpoints import where as checkpoint_note
from catdog_hpo.search.pareto import front_trials
from catdog_hpo.search.progress import Progress, study_pace
from catdog_hpo.search.record import StudyInfo, StudyKey, finished_complete
from catdog_hpo.search.settings import RunSettings
from catdog_hpo.search.space_files import base_image_size
from catdog_hpo.search.storage import mask_password
from catdog_hpo.search.study import Opened, baseline_trial, check_goal, count, open_study
from catdog_hpo.search.worker import WorkerRestart, run_workers, work

if TYPE_CHECKING:
    from catdog_hpo.search.tracking import StudyRun


def run(settings: RunSettings) -> int:
    """Run (or resume) the study until it has ``settings.trials`` finished trials."""
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
    settings, tracked = _open_tracking(settings, opened)
    if grid:
        print(f"grid: {grid:,} points; this run stops after {target:,} of them"
              + (" (the whole grid)" if target == grid else f" (--trials {settings.trials})"))
    budget_s = _announce_budget(study, settings)
    progress = Progress(study, target, enabled=settings.progress, budget_s=budget_s)
    deadline = time.time() + settings.timeout if settings.timeout else None
    # One worker runs here: signals wait for safe points. The parent of K workers only polls.
    previous = interrupts.install(allowed=settings.workers > 1)
    ended = "FAILED"  # the MLflow parent run's status when this run stops
    try:
        if settings.workers == 1:
            work(settings, settings.devices[0], deadline, on_trial_end=progress.poll, opened=opened)
        else:
            run_workers(settings, deadline, progress)
        ended = "FINISHED"
    except WorkerRestart as exc:  # one in-process worker: its CUDA context is gone with it
        raise UserError(f"CUDA error ({exc}); {exc.fate}: rerun the same command "
                        "to resume in a fresh process") from None
    except (KeyboardInterrupt, interrupts.Terminated):
        ended = "KILLED"
        progress.close()
        finished, _, _ = count(study)
        print(f"interrupted at {finished}/{target or '-'} finished trials; the running trial was closed and "
              f"is queued to run again on resume. Resume with the same command.", file=sys.stderr)
        return 130
    finally:
        interrupts.restore(previous)
        if tracked is not None:
            tracked.close(study, ended)
    progress.poll()
    progress.close()
    return _summary(study, target, since=progress.started)


def _open_tracking(settings: RunSettings, opened: Opened) -> tuple[RunSettings, StudyRun | None]:
    """The study's MLflow parent run (search.tracking), opened once here before any worker; a
    server that does not answer is the one warning, and the workers then track nothing."""
    if settings.mlflow is None:
        return settings, None
    from catdog_hpo.search.tracking import StudyRun

    tracked = StudyRun.open(settings.mlflow, opened.study, opened.storage, settings.storage)
    if tracked is None:
        return dataclasses.replace(settings, mlflow=None), None
    print(f"mlflow: logging to {tracked.where()} (the study's run; each trial a child run)")
    return settings, tracked


def _announce_budget(study: optuna.Study, settings: RunSettings) -> float | None:
    """Store --budget on the study (or read the stored one) and say what is left."""
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
    # finished_complete: not a --warm-start history trial, which ran in another study
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if finished_complete(t)]
    if not completed:
        print(f"done: {finished} finished trials, none completed", file=sys.stderr)
        return 1
    if len(study.directions) > 1:
        front = front_trials(study)
        names = study.metric_names or [f"value {i}" for i in range(len(study.directions))]
        print(f"done: {finished}/{target} finished trials; Pareto front: {len(front)} trials "
              f"({', '.join(names)}): " + "; ".join(
                  f"#{t.number} " + " ".join(f"{v:.4g}" for v in t.values) for t in front[:5]))
        print(f"next: catdog-hpo report --study {study.study_name}   "
              f"catdog-hpo export --study {study.study_name} --pareto [--max-params N]")
        return 0
    best = max(completed, key=lambda t: t.value if t.value is not None else -math.inf)
    print(f"done: {finished}/{target or finished} finished trials; best: trial {best.number}, "
          f"val accuracy {best.value:.4f}{over_baseline(study, best.value)}")
    print(study_pace(study, since))
    print(f"next: catdog-hpo export --study {study.study_name}")
    return 0


def over_baseline(study: optuna.Study, value: float | None) -> str:
    """ " (+4.5 points over the baseline's 0.8100, trial 0)", or "" without a completed baseline."""
    base = baseline_trial(study)
    if value is None or base is None or base.state != TrialState.COMPLETE or base.value is None:
        return ""
    return f" ({100 * (value - base.value):+.1f} points over the baseline's {base.value:.4f}, trial {base.number})"
