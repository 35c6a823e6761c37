"""Classification metrics from predicted and true labels: plain torch, no Optuna, no sklearn.

``classification_report`` is what ``retrain`` writes to metrics.json for the validation and the
test set: accuracy, per-class precision/recall/support and the confusion matrix.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ``num_classes`` x ``num_classes``: row = true class, column = predicted class."""
    assert preds.shape == labels.shape and preds.dim() == 1, (tuple(preds.shape), tuple(labels.shape))
    preds, labels = preds.to("cpu", torch.int64), labels.to("cpu", torch.int64)
    flat = labels * num_classes + preds  # one bin per (true, predicted) pair
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``preds`` equal to ``labels`` (0..1); NaN for an empty set."""
    if labels.numel() == 0:
        return math.nan
    return float((preds.to(labels.device) == labels).sum().item()) / labels.numel()


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None  # None (JSON null): undefined, e.g. a class never predicted


def classification_report(preds: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/support and the confusion matrix, as JSON-ready data.

    Precision of a class never predicted, or recall of a class absent from ``labels``, is None.
    """
    cm = confusion_matrix(preds, labels, len(classes))
    n = int(cm.sum())
    correct = int(cm.diag().sum())
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        per_class[str(name)] = {
            "precision": _ratio(tp, int(cm[:, i].sum())),
            "recall": _ratio(tp, int(cm[i, :].sum())),
            "support": int(cm[i, :].sum()),  # images of this class in the set
        }
    return {
        "n": n,
        "accuracy": correct / n if n else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),  # rows: true class, columns: predicted, in ``classes`` order
        "classes": [str(c) for c in classes],
    }


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for fewer than two values."""
    assert values, "mean_std of nothing"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values, xbar=mean)
