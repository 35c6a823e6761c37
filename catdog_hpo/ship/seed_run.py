"""One seed of ``retrain``: what it kept and scored (``SeedRun``), and the line that says so.

Below ``ship.retrain`` (which trains the seeds), ``ship.searched`` (``--no-train``: the search's
weights as the one "seed") and ``ship.retrain_report`` (metrics.json), which all use both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class SeedRun:
    seed: int
    status: str  # fit's: "completed" | "non_finite"
    reason: str
    history: list[dict[str, float]]
    kept_epoch: int  # 1-based epoch whose weights are kept; 0: none
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    val: dict[str, Any] | None = None  # classification_report of the kept weights
    test: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state is not None

    def summary(self) -> dict[str, Any]:
        final = self.history[-1]["val_acc"] if self.history else None
        best = max((h["val_acc"] for h in self.history), default=None)
        return {"seed": self.seed, "status": self.status, "reason": self.reason or None,
                "epochs_run": len(self.history), "kept_epoch": self.kept_epoch,
                "final_val_acc": final, "best_val_acc": best,
                "val_acc": self.val["accuracy"] if self.val else None,
                "test_acc": self.test["accuracy"] if self.test else None,
                "seconds": round(self.seconds, 2)}


def seed_line(run: SeedRun, train_on: str) -> str:
    if not run.ok:
        return f"seed {run.seed}: no model ({run.reason or run.status})"
    which = f"kept epoch {run.kept_epoch} of {len(run.history)}, " + ("the best by val acc" if train_on == "train" else "the final one")
    text = f"seed {run.seed}: val acc {run.val['accuracy']:.4f}{'' if train_on == 'train' else ' (not held out)'}"
    if run.test is not None:
        text += f", test acc {run.test['accuracy']:.4f}"
    stopped = f"; stopped early: {run.reason}" if run.status != "completed" else ""
    return f"{text} ({which}){stopped}"
