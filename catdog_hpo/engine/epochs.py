"""The epoch loop both trainings share, and what it returns. No Optuna here.

``engine.train.fit`` (the whole model on images) and ``engine.heads.fit_head`` (a head on cached
backbone features) differ in how an epoch trains and evaluates; what happens around that is
one rule, kept here: per epoch the lr at its start, one training pass, one evaluation, then the
ONE device->host sync of the epoch (the training loss, validation loss and accuracy read
together). A non-finite loss ends the run (status "non_finite"; that epoch is not in the
history). Otherwise the schedule steps on the validation loss, the epoch joins the history, the
weights are copied when its accuracy beats the best so far (the first epoch on a tie), and
``on_epoch_end`` runs: the study reports and prunes there, and what it raises propagates. Then
the fit's checkpoint is saved; the two together are the epoch's end, which runs inside the
caller's ``EpochEndGuard`` (the search holds Ctrl-C there until the epoch is saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch


# What each epoch's end (its ``on_epoch_end``, then its checkpoint save) runs inside, made anew
# per epoch. The search passes ``interrupts.deferred``: a Ctrl-C that arrives during the report
# must wait until the epoch is saved too, or the retry starts an epoch earlier (no Optuna here,
# so the engine only knows that the block exists).
EpochEndGuard = Callable[[], contextlib.AbstractContextManager[None]]


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float  # mean training criterion over the epoch (label smoothing included)
    val_loss: float  # mean plain cross-entropy on the validation set (no label smoothing)
    val_acc: float  # 0..1
    seconds: float  # wall time of the epoch: training + validation
    lr: float  # learning rate at the start of the epoch (first param group)

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


@dataclass
class FitResult:
    status: str  # "completed" | "non_finite"
    history: list[EpochStats]  # finished epochs; a non-finite epoch is not in it
    best_epoch: int  # 1-based epoch with the highest val accuracy; 0 if none finished
    best_val_acc: float
    best_state: dict[str, torch.Tensor] | None  # CPU copy of the best epoch's weights (the EMA ones with train.ema)
    reason: str = ""  # why the run stopped early, e.g. "non-finite training loss at epoch 3"


@dataclass
class Progress:
    """The epochs so far and the best of them: empty at the start, or a resumed fit's."""

    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0  # 0: no epoch finished
    best_acc: float = 0.0
    best_state: dict[str, torch.Tensor] | None = None  # EpochLoop.snapshot() of the best epoch


class EpochLoop(Protocol):
    """One training's side of the loop: what an epoch trains and scores, on the device."""

    def lr(self) -> float:
        """The learning rate now, as a Python float (no sync)."""

    def train_epoch(self) -> torch.Tensor:
        """One training pass; the mean training loss as a device scalar (no sync)."""

    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean validation loss, accuracy) as device scalars (no sync)."""

    def after_epoch(self, val_loss: float) -> None:
        """Step what steps once per epoch (the lr schedule) on the epoch's validation loss."""

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights the evaluation just scored."""


def run_epochs(loop: EpochLoop, epochs: int, on_epoch_end: Callable[[EpochStats], None] | None,
               progress: Progress | None = None,
               after_report: Callable[[int, Progress], None] | None = None,
               bar: Any = None, epoch_end_guard: EpochEndGuard | None = None) -> FitResult:
    """Run ``loop`` from the epoch after ``progress``'s last up to ``epochs`` (see the module's rule).

    ``after_report(epoch, progress)`` runs after ``on_epoch_end`` (fit checkpoints there, so a
    pruned epoch is not saved); ``bar`` is a tqdm bar (or None) that shows the epoch and its accuracy.
    ``epoch_end_guard()``: the context both run inside, each epoch (``EpochEndGuard``).
    """
    guard = epoch_end_guard if epoch_end_guard is not None else contextlib.nullcontext
    p = progress if progress is not None else Progress()
    for epoch in range(len(p.history) + 1, epochs + 1):
        if bar is not None:
            bar.set_description(f"epoch {epoch}/{epochs}")
        start = time.perf_counter()
        lr = loop.lr()
        train_loss_t = loop.train_epoch()
        val_loss_t, val_acc_t = loop.evaluate()
        # The one device->host sync of the epoch: read its losses and accuracy together.
        train_loss, val_loss, val_acc = torch.stack([train_loss_t, val_loss_t, val_acc_t]).tolist()
        if not math.isfinite(train_loss) or not math.isfinite(val_loss):
            which = "training" if not math.isfinite(train_loss) else "validation"
            return FitResult("non_finite", p.history, p.best_epoch, p.best_acc, p.best_state,
                             reason=f"non-finite {which} loss at epoch {epoch}")
        loop.after_epoch(val_loss)
        stats = EpochStats(epoch, train_loss, val_loss, val_acc, time.perf_counter() - start, lr)
        p.history.append(stats)
        if p.best_epoch == 0 or val_acc > p.best_acc:
            p.best_epoch, p.best_acc, p.best_state = epoch, val_acc, loop.snapshot()
        if bar is not None:
            bar.set_postfix(val_acc=f"{val_acc:.3f}", refresh=False)
        with guard():  # the report and the save as one step: a stop held over the report lands after the save
            if on_epoch_end is not None:
                on_epoch_end(stats)  # may raise (the study's TrialPruned): it propagates unchanged
            if after_report is not None:
                after_report(epoch, p)
    return FitResult("completed", p.history, p.best_epoch, p.best_acc, p.best_state)
