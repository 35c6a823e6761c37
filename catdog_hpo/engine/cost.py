"""The cost model: how many seconds a config will take to train on this device. No Optuna here.

An epoch's seconds are modelled as

    compute  (3 x forward FLOPs x train images + forward FLOPs x val images) / flop_rate
  + memory   (3 x activations x train images + activations x val images) x act_s
             (activations: output values of every layer per image; batch norm, activations,
             pooling and the convolutions' own reads and writes are memory-bound: on a CPU they
             cost as much as the arithmetic. Over 14 random seed-cnn configs at 64 px the
             measured/predicted ratios spread 3.9x (max/min) with the best two-term fit, 1.8-2.1x
             with this term as ``calibrate`` measures it: bench/cost_model.py)
  + steps    (train batches + val batches) x layers x step_s  (per-layer, per-batch overhead: kernel
             launches, framework dispatch; it dominates small, deep nets on a CPU)
  + update   train batches x params x UPDATE_FLOPS / flop_rate   (the optimizer touching every weight)

``flop_rate`` (FLOP/s), ``act_s`` (s per value) and ``step_s`` (s) are measured once per process
by ``calibrate``: short epochs of three reference CNNs on a slice of the study's own images (a
few seconds on a CPU), each dominated by a different term. The study then corrects the prediction
by the measured/predicted ratio of the epochs it has already run on this device
(``Calibration.corrected``), so the model only has to get the *relative* cost of configs right.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any

import torch

from catdog_hpo.config import BlockConfig, ModelConfig, TrainConfig, TrialConfig
from catdog_hpo.data import ImageSet
from catdog_hpo.engine.runtime import val_batch_size

UPDATE_FLOPS = 20  # FLOP-equivalents per parameter per optimizer step (Adam reads/writes ~5 tensors)
EMA_FLOPS = 6  # ... added by train.ema (one lerp: reads the weight and the average, writes the average)
L1_FLOPS = 8  # ... added by optim.l1 (|w| and its sum forward, sign(w) x l1 added to the gradient backward)
TRAIN_FLOP_FACTOR = 3  # forward + backward (input and weight gradients) = 3 x forward
CALIBRATION_TRAIN = 768  # images per calibration epoch (12 batches; a few seconds on 2 CPU cores at 32-64 px)
CALIBRATION_VAL = 64
_CORRECTION_WINDOW = 20  # recent measured trials the study correction is the median of
_NO_FLOP_COST = 1e18  # FLOP/s standing for "arithmetic priced by the other terms" (finite: stored as JSON)


@dataclass(frozen=True)
class Workload:
    """What one config asks of the device: the inputs of the cost model."""

    flops: int  # forward FLOPs per image (engine.models.model_cost)
    params: int
    layers: int  # leaf modules run per forward pass (layer_stats)
    image_size: int  # px
    batch_size: int
    n_train: int  # images per epoch
    n_val: int
    epochs: int
    setup_flops: int = 0  # one-off FLOPs before the first epoch (a frozen backbone's feature extraction)
    acts: int = 0  # output values of all leaf modules per image, forward (layer_stats)
    val_passes: int = 1  # forwards per validation image: 2 with augment.tta (the image and its mirror)
    update_flops: int = UPDATE_FLOPS  # per parameter per optimizer step (more with train.ema, optim.l1)


def _val_steps(w: Workload) -> int:
    """Validation forwards per epoch, as engine.train makes them (3-channel images)."""
    return w.val_passes * math.ceil(w.n_val / val_batch_size(w.n_val, 3 * w.image_size * w.image_size))


@dataclass(frozen=True)
class Calibration:
    """This device's measured rates; ``correction`` multiplies every prediction (1 until the
    study has measured epochs)."""

    flop_rate: float  # FLOP/s
    step_s: float  # seconds of fixed overhead per layer per batch
    act_s: float = 0.0  # seconds per activation value (forward; training counts 3x)
    correction: float = 1.0
    measured: int = 0  # trials the correction is drawn from

    def epoch_seconds(self, w: Workload) -> float:
        """Predicted seconds of one epoch (training + validation), uncorrected."""
        work, values, overhead = _terms(w)
        return work / self.flop_rate + values * self.act_s + overhead * self.step_s

    def predict(self, w: Workload, epochs: float | None = None) -> float:
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


def _terms(w: Workload) -> tuple[float, float, float]:
    """An epoch's (FLOPs, activation values, layer-steps): what flop_rate, act_s and step_s price."""
    steps = math.ceil(w.n_train / w.batch_size)
    n_val = w.val_passes * w.n_val
    work = TRAIN_FLOP_FACTOR * w.flops * w.n_train + w.flops * n_val + steps * w.params * w.update_flops
    values = TRAIN_FLOP_FACTOR * w.acts * w.n_train + w.acts * n_val
    return float(work), float(values), float((steps + _val_steps(w)) * w.layers)


def layer_stats(model: ModelConfig, num_classes: int, image_size: int) -> tuple[int, int]:
    """(leaf modules, their output values per image) of the built model, from one forward pass on
    the meta device (no memory, a few ms)."""
    from catdog_hpo.engine.models import FAMILIES

    with torch.device("meta"):
        net = FAMILIES[model.family](model, num_classes, image_size)
        leaves = [m for m in net.modules() if not any(True for _ in m.children())]
        values = [0]

        def count(_m: torch.nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                values[0] += out[0].numel()

        hooks = [m.register_forward_hook(count) for m in leaves]
        try:
            net(torch.empty(1, 3, image_size, image_size))
        finally:
            for h in hooks:
                h.remove()
    return len(leaves), values[0]


def workload(cfg: TrialConfig, flops: int, params: int, num_classes: int, n_train: int, n_val: int,
             features_cached: bool = False) -> Workload:
    """What ``cfg`` asks of the device. ``flops``: one forward of the network per image
    (TrialKey.FLOPS), not the shipped model's inference figure: training runs the network once per
    image, and only validation repeats it with augment.tta (``val_passes``)."""
    from catdog_hpo.engine import heads
    from catdog_hpo.engine.tta import forwards_per_image

    if heads.applies(cfg):
        # Frozen backbone: every epoch trains only the head on cached backbone features
        # (engine/heads.py); extracting them is a one-off forward pass, unless already cached.
        head = heads.head_cost(cfg, num_classes)
        setup = 0 if features_cached else flops * (n_train * heads.n_views(cfg) + n_val)
        return Workload(flops=head.flops, params=head.params, layers=head.layers, image_size=cfg.image_size,
                        batch_size=cfg.train.batch_size, n_train=n_train, n_val=n_val,
                        epochs=cfg.train.epochs, setup_flops=setup)
    layers, acts = layer_stats(cfg.model, num_classes, cfg.image_size)
    update = UPDATE_FLOPS + (EMA_FLOPS if cfg.train.ema > 0 else 0) + (L1_FLOPS if cfg.optim.l1 > 0 else 0)
    return Workload(flops=flops, params=params, layers=layers, image_size=cfg.image_size,
                    batch_size=cfg.train.batch_size, n_train=n_train, n_val=n_val, epochs=cfg.train.epochs,
                    acts=acts, val_passes=forwards_per_image(cfg), update_flops=update)


# Three reference CNNs, each dominated by another term: a tiny one at a small batch (its epoch is
# mostly per-layer overhead), the same at a large batch (its values: it has the most activation
# values per FLOP) and a half-width tutorial one (mostly arithmetic). (model, batch size)
_TINY = ModelConfig(family="cnn", blocks=(BlockConfig(8),), head="gap", dropout=0.0)
_REFERENCES = (
    (_TINY, 32),
    (_TINY, 256),
    (ModelConfig(family="cnn", blocks=(BlockConfig(16), BlockConfig(32), BlockConfig(64)), head="fc",
                 fc_hidden=128, dropout=0.0), 64),
)


def calibrate(data: ImageSet, device: torch.device) -> Calibration:
    """Time two short epochs of each reference CNN on a slice of ``data`` (the study's images, at
    the trial's size) after an untimed warm-up, and fit flop_rate, act_s and step_s."""
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
    fit(TrialConfig(image_size=size, model=_TINY, train=TrainConfig(epochs=1, batch_size=64)), warm, device)
    for model, batch in _REFERENCES:
        cfg = TrialConfig(image_size=size, model=model, train=TrainConfig(epochs=3, batch_size=batch, seed=0))
        cost = model_cost(model, classes, size)
        result = fit(cfg, small, device)
        seconds = min(h.seconds for h in result.history)  # the quicker epoch: less of others' noise
        rows.append((workload(cfg, cost.flops, cost.params, classes, n_train, n_val), seconds))
    return fit_rates(rows)


def fit_rates(rows: list[tuple[Workload, float]]) -> Calibration:
    """flop_rate, act_s and step_s from (workload, measured epoch seconds) rows: non-negative least
    squares in relative error (each row's error over its seconds, so the big reference does not
    outweigh the tiny one), by trying every subset of the three terms (3 unknowns: 7 subsets) and
    keeping the best fit whose rates are all positive. A rate fitted to 0 is a term this device
    does not pay for separately (timing noise, or another term already covers it)."""
    assert rows and all(t > 0 for _, t in rows)
    a = torch.tensor([[x / t for x in _terms(w)] for w, t in rows], dtype=torch.float64)
    scale = a.abs().amax(0).clamp_min(1e-300)  # columns differ by 10^10: scale them to ~1
    a = a / scale
    ones = torch.ones(len(rows), 1, dtype=torch.float64)
    best: tuple[float, list[float]] | None = None
    for mask in range(1, 8):
        cols = [j for j in range(3) if mask >> j & 1]
        if len(cols) > len(rows):
            continue
        sol = torch.linalg.lstsq(a[:, cols], ones).solution[:, 0]
        if not bool((sol > 0).all()):
            continue
        err = float(((a[:, cols] @ sol[:, None] - ones) ** 2).sum())
        if best is None or err < best[0] - 1e-12:
            coef = [0.0, 0.0, 0.0]
            for j, v in zip(cols, sol.tolist()):
                coef[j] = v / float(scale[j])
            best = (err, coef)
    assert best is not None, "a single positive term always fits positive times"
    per_flop, act_s, step_s = best[1]
    return Calibration(flop_rate=1.0 / per_flop if per_flop > 0 else _NO_FLOP_COST, step_s=step_s, act_s=act_s)

