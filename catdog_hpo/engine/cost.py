"""The cost model: how many seconds a config will take to train on this device. No Optuna here.

An epoch's seconds are modelled as

    compute  (3 x forward FLOPs x train images + forward FLOPs x val images) / flop_rate
  + steps    (train batches + val batches) x layers x step_s  (per-layer, per-batch overhead: kernel
             launches, framework dispatch; it dominates small, deep nets on a CPU)
  + update   train batches x params x UPDATE_FLOPS / flop_rate   (the optimizer touching every weight)

``flop_rate`` (FLOP/s) and ``step_s`` (s) are measured once per process by ``calibrate``: one
short epoch each of two reference CNNs on a slice of the study's own images (a few seconds on a
CPU). The study then corrects the prediction by the measured/predicted ratio of the epochs it has
already run on this device (``Calibration.corrected``), so the model only has to get the
*relative* cost of configs right, which FLOPs, parameters and batch counts do.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

import torch

from catdog_hpo.config import BlockConfig, ModelConfig, TrainConfig, TrialConfig
from catdog_hpo.data import ImageSet
from catdog_hpo.engine.runtime import val_batch_size

UPDATE_FLOPS = 20  # FLOP-equivalents per parameter per optimizer step (Adam reads/writes ~5 tensors)
TRAIN_FLOP_FACTOR = 3  # forward + backward (input and weight gradients) = 3 x forward
CALIBRATION_TRAIN = 768  # images per calibration epoch (12 batches; a few seconds on 2 CPU cores at 32-64 px)
CALIBRATION_VAL = 64
_CORRECTION_WINDOW = 20  # recent measured trials the study correction is the median of


@dataclass(frozen=True)
class Workload:
    """What one config asks of the device: the inputs of the cost model."""

    flops: int  # forward FLOPs per image (engine.models.model_cost)
    params: int
    layers: int  # leaf modules run per forward pass (count_layers)
    image_size: int  # px
    batch_size: int
    n_train: int  # images per epoch
    n_val: int
    epochs: int
    setup_flops: int = 0  # one-off FLOPs before the first epoch (a frozen backbone's feature extraction)


def _val_steps(w: Workload) -> int:
    """Validation batches per epoch, as engine.train makes them (3-channel images)."""
    return math.ceil(w.n_val / val_batch_size(w.n_val, 3 * w.image_size * w.image_size))


@dataclass(frozen=True)
class Calibration:
    """This device's measured rates; ``correction`` multiplies every prediction (1 until the
    study has measured epochs)."""

    flop_rate: float  # FLOP/s
    step_s: float  # seconds of fixed overhead per layer per batch
    correction: float = 1.0
    measured: int = 0  # trials the correction is drawn from

    def epoch_seconds(self, w: Workload) -> float:
        """Predicted seconds of one epoch (training + validation), uncorrected."""
        steps = math.ceil(w.n_train / w.batch_size)
        val_steps = _val_steps(w)
        compute = (TRAIN_FLOP_FACTOR * w.flops * w.n_train + w.flops * w.n_val) / self.flop_rate
        update = steps * w.params * UPDATE_FLOPS / self.flop_rate
        return compute + update + (steps + val_steps) * w.layers * self.step_s

    def predict(self, w: Workload, epochs: int | None = None) -> float:
        """Predicted seconds of ``epochs`` (default: all of the workload's), corrected."""
        setup = w.setup_flops / self.flop_rate if epochs is None else 0.0
        return self.correction * (self.epoch_seconds(w) * (w.epochs if epochs is None else epochs) + setup)

    def corrected(self, pairs: list[tuple[float, float]]) -> Calibration:
        """This calibration corrected by (measured, uncorrected predicted) epoch seconds of the
        study's recent trials on this device: the median ratio, so one odd trial does not move it."""
        ratios = [m / p for m, p in pairs[-_CORRECTION_WINDOW:] if m > 0 and p > 0]
        if not ratios:
            return replace(self, correction=1.0, measured=0)
        return replace(self, correction=statistics.median(ratios), measured=len(ratios))


def count_layers(model: ModelConfig, num_classes: int, image_size: int) -> int:
    """Leaf modules of the built model (on the meta device: no memory, a few ms)."""
    from catdog_hpo.engine.models import FAMILIES

    with torch.device("meta"):
        net = FAMILIES[model.family](model, num_classes, image_size)
    return sum(1 for m in net.modules() if not any(True for _ in m.children()))


def workload(cfg: TrialConfig, flops: int, params: int, num_classes: int, n_train: int, n_val: int,
             features_cached: bool = False) -> Workload:
    from catdog_hpo.engine import heads

    if heads.applies(cfg):
        # Frozen backbone: every epoch trains only the head on cached backbone features
        # (engine/heads.py); extracting them is a one-off forward pass, unless already cached.
        head = heads.head_cost(cfg, num_classes)
        setup = 0 if features_cached else flops * (n_train * heads.n_views(cfg) + n_val)
        return Workload(flops=head.flops, params=head.params, layers=head.layers, image_size=cfg.image_size,
                        batch_size=cfg.train.batch_size, n_train=n_train, n_val=n_val,
                        epochs=cfg.train.epochs, setup_flops=setup)
    return Workload(flops=flops, params=params, layers=count_layers(cfg.model, num_classes, cfg.image_size),
                    image_size=cfg.image_size, batch_size=cfg.train.batch_size,
                    n_train=n_train, n_val=n_val, epochs=cfg.train.epochs)


# Two reference CNNs: a tiny one (its epoch is mostly per-layer overhead) and a half-width tutorial
# one (mostly arithmetic). Their two timings give step_s and flop_rate.
_REFERENCES = (
    ModelConfig(family="cnn", blocks=(BlockConfig(8),), head="gap", dropout=0.0),
    ModelConfig(family="cnn", blocks=(BlockConfig(16), BlockConfig(32), BlockConfig(64)), head="fc",
                fc_hidden=128, dropout=0.0),
)


def calibrate(data: ImageSet, device: torch.device) -> Calibration:
    """Time two short epochs of each reference CNN on a slice of ``data`` (the study's images, at
    the trial's size) after an untimed warm-up, and solve for flop_rate and step_s."""
    from catdog_hpo.engine.models import model_cost
    from catdog_hpo.engine.train import fit

    n_train, n_val = min(CALIBRATION_TRAIN, len(data.train_y)), min(CALIBRATION_VAL, len(data.val_y))
    small = ImageSet(data.train_x[:n_train], data.train_y[:n_train], data.val_x[:n_val], data.val_y[:n_val],
                     data.classes, fingerprint=data.fingerprint)
    size, classes = data.image_size, len(data.classes)
    rows: list[tuple[Workload, float]] = []
    # Untimed: the process's first training pays one-off costs (thread pools, allocator, kernel
    # selection) that no later epoch pays.
    warm = ImageSet(small.train_x[:64], small.train_y[:64], small.val_x[:16], small.val_y[:16], data.classes, "")
    fit(TrialConfig(image_size=size, model=_REFERENCES[0], train=TrainConfig(epochs=1, batch_size=64)), warm, device)
    for model in _REFERENCES:
        cfg = TrialConfig(image_size=size, model=model, train=TrainConfig(epochs=3, batch_size=64, seed=0))
        cost = model_cost(model, classes, size)
        result = fit(cfg, small, device)
        seconds = min(h.seconds for h in result.history)  # the quicker epoch: less of others' noise
        rows.append((workload(cfg, cost.flops, cost.params, classes, n_train, n_val), seconds))
    return _solve(rows)


def _solve(rows: list[tuple[Workload, float]]) -> Calibration:
    """flop_rate and step_s from two (workload, measured epoch seconds) rows (2 x 2 linear
    system in 1/flop_rate and step_s); falls back to step_s = 0 when timing noise makes it
    unsolvable (negative rates)."""
    def terms(w: Workload) -> tuple[float, float]:
        steps = math.ceil(w.n_train / w.batch_size)
        val_steps = _val_steps(w)
        work = TRAIN_FLOP_FACTOR * w.flops * w.n_train + w.flops * w.n_val + steps * w.params * UPDATE_FLOPS
        return float(work), float((steps + val_steps) * w.layers)

    (w1, t1), (w2, t2) = rows
    (a1, b1), (a2, b2) = terms(w1), terms(w2)
    det = a1 * b2 - a2 * b1
    if det != 0:
        inv_rate = (t1 * b2 - t2 * b1) / det
        step_s = (a1 * t2 - a2 * t1) / det
        if inv_rate > 0 and step_s >= 0:
            return Calibration(flop_rate=1.0 / inv_rate, step_s=step_s)
    # Unsolvable: timing noise, or the big net ran more flops per second than the tiny one. The
    # tiny net's epoch is nearly all per-layer overhead: step_s from it, the rate from what the
    # big net's epoch has left. (step_s = 0 here once predicted a tiny net 7x low.)
    (sa, sb, st), (ba, bb, bt) = sorted(((a1, b1, t1), (a2, b2, t2)))
    step_s = st / max(sb, 1.0)
    rest = bt - step_s * bb
    return Calibration(flop_rate=ba / (rest if rest > 0.1 * bt else bt), step_s=step_s)
