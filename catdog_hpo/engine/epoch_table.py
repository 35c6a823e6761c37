"""The per-epoch table ``train`` and ``retrain`` print while a model trains: one format."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catdog_hpo.engine.epochs import EpochStats

COLUMNS = ("epoch", "train loss", "val loss", "val acc", "seconds", "lr")
_ROW = "{:>5}  {:>10}  {:>8}  {:>7}  {:>7}  {:>9}"
HEAD = _ROW.format(*COLUMNS)


def row(stats: EpochStats) -> str:
    """One line of the table: losses and accuracy to 4 decimals, wall seconds, learning rate."""
    return _ROW.format(stats.epoch, f"{stats.train_loss:.4f}", f"{stats.val_loss:.4f}",
                       f"{stats.val_acc:.4f}", f"{stats.seconds:.2f}", f"{stats.lr:.3g}")
