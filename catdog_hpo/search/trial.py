"""One trial: the glue between Optuna and the engine, trial -> TrialConfig -> fit -> reported value.

Everything Optuna-specific about one trial lives here (suggest, report, prune, user attributes);
the engine (``train.fit``) knows nothing of Optuna and only calls ``on_epoch_end``. What a study
optimises (the objectives registry) is ``search.objectives``; the limits a config must meet
before training, ``search.limits``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import optuna
import torch

from catdog_hpo.search import interrupts, optuna_compat
from catdog_hpo.config import TrialConfig, check_optim, to_dict
from catdog_hpo.data.provider import ImageProvider
from catdog_hpo.errors import ConfigError
from catdog_hpo.search.limits import Limits, check_cost
from catdog_hpo.search.record import TrialKey, asked_by_name
from catdog_hpo.search.spaces import Space, resolve

if TYPE_CHECKING:
    from optuna.artifacts import FileSystemArtifactStore

    from catdog_hpo.engine.epochs import EpochStats
    from catdog_hpo.search.budget import Guard
    from catdog_hpo.search.checkpoints import Checkpoints
    from catdog_hpo.search.pareto import ParetoRule


EpochHook = Callable[[optuna.Trial, "EpochStats"], None]  # called at each epoch's end, after the report


class TrialFailed(Exception):
    """A trial that ran but cannot give a value (non-finite loss, out of memory): state FAIL."""


class _StoppedEarly(Exception):
    """A multi-objective trial stopped at an epoch's end (the Pareto rule, the budget).

    It is told COMPLETE with the values of its best epoch so far and marked
    TrialKey.STOPPED_EARLY, not told PRUNED: Optuna's TPE ranks pruned trials by
    ``study.direction``, which a multi-objective study does not have, so a PRUNED trial with
    reported epochs breaks every later suggestion. As COMPLETE, TPE, random and NSGA-II all learn
    from it; ``record.outcome`` shows it as pruned and keeps it off the front and out of export."""


@dataclass(frozen=True)
class Goal:
    """What a trial returns: the objectives (catdog_hpo.search.objectives), where latency is
    timed, and the multi-objective pruning rule (None: no pruning of multi-objective trials)."""

    objectives: tuple[str, ...] = ("accuracy",)
    latency_device: str = "cpu"  # "cpu" | "cuda" (the trial's GPU when it trains on one)
    rule: ParetoRule | None = None

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1


def run_trial(
    trial: optuna.Trial,
    space: Space,
    overrides: dict[str, Any],
    images: ImageProvider,
    limits: Limits,
    artifact_store: FileSystemArtifactStore | None = None,
    goal: Goal = Goal(),
    guard: Guard | None = None,
    checkpoints: Checkpoints | None = None,
    on_epoch: EpochHook | None = None,
) -> float | list[float]:
    """Train one trial and return its value: the validation accuracy of its BEST epoch, the
    epoch retrain keeps (with ``goal.multi``: the list of its objective values, accuracy first,
    then the costs in ``goal.objectives`` order).

    Raises optuna.TrialPruned when the pruner stops it, the time budget is spent at an epoch's
    end (with ``goal.multi`` both instead return the best epoch's values so far, marked stopped
    early: see ``_StoppedEarly``), or a guard turns it away before training (--max-params/--max-flops, an infeasible
    build, ``guard``: catdog_hpo.search.budget.Guard's cost model and time budget). A turned-away
    trial has the reason in the ``rejected`` user attribute and a positive Optuna constraint, so
    TPE learns to propose fewer such configs. TrialFailed for a run without a value.
    ``checkpoints`` (search.checkpoints.Checkpoints): save the training state at epoch ends, and
    as the retry of an interrupted trial go on from its last one, its epochs reported again first.
    ``on_epoch(trial, stats)``: called at each epoch's end after the report (MLflow's per-epoch metrics).
    """
    from catdog_hpo.engine.train import fit

    try:
        cfg = resolve(space, trial, overrides)
        check_optim(cfg.optim)  # e.g. nesterov without momentum: turned away, not failed
        num_classes = len(images.get(cfg.image_size).classes)
        cost = check_cost(cfg, num_classes, limits)
        if guard is not None:
            guard.admit(trial, cfg, cost[TrialKey.FLOPS], cost[TrialKey.N_PARAMS], images.get(cfg.image_size),
                        images.cache_dir)
    except ConfigError as exc:
        reject(trial, str(exc))
        raise optuna.TrialPruned(f"rejected: {exc}") from None
    trial.set_user_attr(TrialKey.CONFIG, to_dict(cfg))
    for key, value in cost.items():
        trial.set_user_attr(key, value)
    from catdog_hpo.engine.device import device_label

    trial.set_user_attr(TrialKey.DEVICE, device_label(images.device))  # a pinned worker's own GPU
    costs = _costs(trial, cfg, num_classes, cost, images.device, goal)
    data = images.get(cfg.image_size)
    history: list[dict[str, float]] = []
    # A config the user asked for by name (the baseline, --enqueue, --warm-start's best) runs all
    # its epochs: the pruner judges early accuracy, and a known-good config starts no faster than
    # the rest (SHA's first rung is epoch 1). The pruner still sees its reports; --budget still
    # stops it.
    pruned_ok = not asked_by_name(trial.user_attrs)

    def on_epoch_end(stats: EpochStats) -> None:
        history.append(asdict(stats))
        # Ctrl-C waits for the store writes. In fit this block nests in the epoch's end (see
        # below), and the signal stops the trial only once the epoch is saved too.
        with interrupts.deferred():
            if goal.multi:
                prune = _multi_objective_step(trial, goal, costs, stats.epoch, stats.val_acc, cfg.train.epochs,
                                              pruned_ok)
            else:
                trial.report(stats.val_acc, stats.epoch)
                # A rung at the last epoch decides nothing: its epochs are paid for, and a
                # trial pruned there could never be exported (SHA's rungs 2, 6 of 6 epochs).
                prune = stats.epoch < cfg.train.epochs and trial.should_prune()
                prune = prune and pruned_ok  # asked, never pruned (should_prune ran: SHA records its rungs)
            if not prune and guard is not None and stats.epoch < cfg.train.epochs and guard.overrun():
                trial.set_user_attr(TrialKey.BUDGET_STOP, f"budget spent after epoch {stats.epoch}")
                prune = True
            if prune:
                _record_history(trial, history)
                if goal.multi:
                    trial.set_user_attr(TrialKey.STOPPED_EARLY, stats.epoch)
        if on_epoch is not None:  # once per epoch, beside the pruner's report: MLflow (search.tracking)
            on_epoch(trial, stats)
        if prune:
            raise (_StoppedEarly if goal.multi else optuna.TrialPruned)(f"pruned after epoch {stats.epoch}")

    spec = checkpoints.start(trial, cfg, data) if checkpoints is not None else None
    try:
        if spec is not None and spec.resume is not None:
            from catdog_hpo.search.checkpoints import replay

            for stats in replay(spec.resume.history):  # the pruner sees the taken-over epochs as they were
                on_epoch_end(stats)
        with interrupts.allowed():  # training: a signal stops it at once
            # feature_cache: a frozen-backbone trial trains its head on cached features (engine/heads.py)
            # epoch_end_guard: a signal held over an epoch's report waits for its checkpoint save as
            # well (interrupts.deferred nests), else the retry would start an epoch earlier.
            result = fit(cfg, data, images.device, on_epoch_end=on_epoch_end, feature_cache=images.cache_dir,
                         checkpoint=spec, epoch_end_guard=interrupts.deferred)
    except _StoppedEarly:
        best = max(history, key=lambda h: (h["val_acc"], -h["epoch"]))  # ties: the earlier epoch
        trial.set_user_attr(TrialKey.BEST_EPOCH, int(best["epoch"]))
        return [best["val_acc"], *costs.values()]
    _record_history(trial, history)
    trial.set_user_attr(TrialKey.BEST_EPOCH, result.best_epoch)
    if result.status != "completed":
        raise TrialFailed(result.reason or result.status)
    if checkpoints is not None and spec is not None:  # all its epochs ran: its best weights may ship
        checkpoints.keep_best(trial, cfg, data.classes, spec.key, result)
    if artifact_store is not None:
        from catdog_hpo.search.artifacts import upload_training_curves

        upload_training_curves(trial.study, trial, history, artifact_store)
    assert result.history, "a completed fit has at least one epoch"
    # The value is the best epoch's accuracy: the epoch whose weights retrain keeps.
    if goal.multi:
        return [result.best_val_acc, *costs.values()]
    return result.best_val_acc


def reject(trial: optuna.Trial, reason: str) -> None:
    """Record why ``trial``'s config was turned away before training, as a user attribute and
    as a violated Optuna constraint (TPE puts such trials with the worst, so it samples fewer
    like them); the study tells it PRUNED and does not count it toward --trials."""
    from catdog_hpo.search.record import REJECTION_CONSTRAINT

    trial.set_user_attr(TrialKey.REJECTED, reason)
    trial.set_constraint(REJECTION_CONSTRAINT, 1.0)


def _costs(trial: optuna.Trial, cfg: TrialConfig, num_classes: int, cost: dict[str, int],
           device: torch.device, goal: Goal) -> dict[str, float]:
    """The trial's cost objectives (name -> value, in goal order), known before training, of the
    model as shipped (``cost``: search.limits.check_cost); times the latency (recorded with its
    method) when it is one of them."""
    from catdog_hpo.search.objectives import OBJECTIVES

    known: dict[str, float] = {k: float(v) for k, v in cost.items()}
    if "latency" in goal.objectives:
        from catdog_hpo.engine.latency import measure_config

        where = device if goal.latency_device == "cuda" and device.type == "cuda" else torch.device(goal.latency_device)
        # The model as shipped: with augment.tta the exported files run the flip average (engine.tta).
        latency = measure_config(cfg.model, num_classes, cfg.image_size, where, tta=cfg.augment.tta)
        trial.set_user_attr(TrialKey.LATENCY_MS, latency.ms)
        trial.set_user_attr(TrialKey.LATENCY_METHOD, latency.method)
        known[TrialKey.LATENCY_MS] = latency.ms
    return {name: known[OBJECTIVES[name].attr] for name in goal.objectives[1:]}


def _multi_objective_step(trial: optuna.Trial, goal: Goal, costs: dict[str, float], epoch: int,
                          val_acc: float, last_epoch: int, pruned_ok: bool) -> bool:
    """Record the epoch's accuracy and apply the Pareto rule (catdog_hpo.search.pareto), unless
    not ``pruned_ok`` (a config asked for by name).

    Trial.report refuses multi-objective studies, so the value goes to the storage directly:
    the same record, and the dashboard and report draw it the same way."""
    trial.storage.set_trial_intermediate_value(optuna_compat.trial_id(trial), epoch, val_acc)
    if goal.rule is None or not pruned_ok:
        return False
    from catdog_hpo.search.pareto import decide_for_trial

    decision = decide_for_trial(trial, goal.objectives, costs, epoch, val_acc, last_epoch, goal.rule)
    if decision.prune:
        trial.set_user_attr(TrialKey.PRUNED_BY, decision.reason)
    return decision.prune


def _record_history(trial: optuna.Trial, history: list[dict[str, float]]) -> None:
    trial.set_user_attr(TrialKey.HISTORY, history)
    trial.set_user_attr(TrialKey.EPOCHS_RUN, len(history))
    trial.set_user_attr(TrialKey.MEASURED_S, round(sum(h["seconds"] for h in history), 3))
    if history:
        trial.set_user_attr(TrialKey.SEC_PER_EPOCH, round(sum(h["seconds"] for h in history) / len(history), 4))
