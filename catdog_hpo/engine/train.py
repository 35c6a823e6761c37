"""fit(): one training run of a TrialConfig on an ImageSet, airbench-style. No Optuna here.

The hot loop: the decoded uint8 images live on the training device; every epoch is one
``randperm`` on the device, index slicing, batched augmentation on the device, forward, loss,
backward, step. Losses and the correct count accumulate in device tensors and are read ONCE per
epoch; that read is where ``on_epoch_end`` runs (the study reports and prunes there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from catdog_hpo.config import OptimConfig, TrialConfig
from catdog_hpo.data import ImageSet
from catdog_hpo.engine.augment import augment_batch, normalize_batch
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.engine.models import build_model

VAL_BATCH_FACTOR = 2  # validation batches are this many times the training batch (no activations kept)
PLATEAU_PATIENCE = 2  # epochs without a val-loss improvement before ReduceLROnPlateau cuts the lr


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
    best_state: dict[str, torch.Tensor] | None  # CPU copy of the best epoch's weights
    reason: str = ""  # why the run stopped early, e.g. "non-finite training loss at epoch 3"


# --------------------------------------------------------------------------- optimizers


def check_optim(o: OptimConfig) -> None:
    """ConfigError for optimizer settings torch would refuse (fit calls it before training)."""
    if o.nesterov and o.name == "sgd" and o.momentum <= 0:
        raise ConfigError(f"optim.nesterov: needs optim.momentum > 0 (got {o.momentum})")
    if o.name in ("sgd", "rmsprop") and not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"optim.momentum: {o.momentum!r} must be in [0, 1)")


def _sgd(params: list[nn.Parameter], o: OptimConfig, cuda: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay, fused=cuda or None)


def _adam(params: list[nn.Parameter], o: OptimConfig, cuda: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, fused=cuda or None)


def _adamw(params: list[nn.Parameter], o: OptimConfig, cuda: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=cuda or None)


def _rmsprop(params: list[nn.Parameter], o: OptimConfig, cuda: bool) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


# fused=True on CUDA: one kernel per step for all parameters (the CPU keeps the default).
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], OptimConfig, bool], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "rmsprop": _rmsprop,
}


# --------------------------------------------------------------------------- schedulers


@dataclass
class Schedule:
    scheduler: Any  # a torch lr scheduler, or None
    every: str  # "step": after each optimizer step; "epoch": after each epoch; "val": each epoch, given the val loss

    def after_step(self) -> None:
        if self.every == "step":
            self.scheduler.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.every == "epoch" and self.scheduler is not None:
            self.scheduler.step()
        elif self.every == "val":
            self.scheduler.step(val_loss)


def _no_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    return Schedule(None, "epoch")


def _step_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    return Schedule(torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma), "epoch")


def _cosine_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    # stepped per optimizer step: a smooth curve from lr to 0 over the whole run
    return Schedule(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps), "step")


def _onecycle_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    # lr peaks at optim.lr; momentum is left as configured (no momentum cycling)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=epochs * steps,
                                                cycle_momentum=False)
    return Schedule(sched, "step")


def _plateau_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=o.gamma,
                                                       patience=PLATEAU_PATIENCE)
    return Schedule(sched, "val")


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, OptimConfig, int, int], Schedule]] = {
    "none": _no_schedule,
    "step": _step_schedule,
    "cosine": _cosine_schedule,
    "onecycle": _onecycle_schedule,
    "plateau": _plateau_schedule,
}


# --------------------------------------------------------------------------- the loop


@dataclass
class _Loop:
    """Everything one epoch needs, on the device."""

    cfg: TrialConfig
    model: nn.Module  # the module itself (its state_dict is what we keep)
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its torch.compile'd wrapper
    params: list[nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    criterion: nn.Module
    gen: torch.Generator  # on the device: shuffling and augmentation
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    cuda: bool
    n_batches: int  # training batches per epoch
    bar: Any = field(default=None)  # tqdm bar or None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cuda and self.cfg.train.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last (NHWC) lets cuDNN use its fastest convolution kernels
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    def train_epoch(self) -> torch.Tensor:
        """One pass over the shuffled training set; returns the mean loss as a device scalar."""
        t = self.cfg.train
        bs, accum = t.batch_size, t.accum_steps
        self.model.train()
        perm = torch.randperm(self.train_x.shape[0], device=self.train_x.device, generator=self.gen)
        loss_sum = torch.zeros((), device=self.train_x.device)
        for b in range(self.n_batches):
            idx = perm[b * bs:(b + 1) * bs]
            # index_select, not x[idx]: advanced indexing copies uint8 images element by element
            # on the CPU (about 25x slower per batch, measured in bench/pipeline.py).
            x = self._layout(augment_batch(self.train_x.index_select(0, idx), self.cfg.augment, self.gen))
            with self._autocast():
                loss = self.criterion(self.forward(x), self.train_y.index_select(0, idx))
            (loss / accum).backward()  # accumulated gradients average over the accum_steps batches
            loss_sum += loss.detach()  # stays on the device: no sync per step
            if (b + 1) % accum == 0 or b + 1 == self.n_batches:
                if t.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.params, t.grad_clip)  # no host sync
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.schedule.after_step()
            if self.bar is not None:
                self.bar.update(1)
        return loss_sum / self.n_batches

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean plain cross-entropy, accuracy) on the validation set, as device scalars."""
        self.model.eval()
        n = self.val_x.shape[0]
        step = self.cfg.train.batch_size * VAL_BATCH_FACTOR
        loss_sum = torch.zeros((), device=self.val_x.device)
        correct = torch.zeros((), device=self.val_x.device)
        for i in range(0, n, step):
            x = self._layout(normalize_batch(self.val_x[i:i + step]))
            y = self.val_y[i:i + step]
            with self._autocast():
                logits = self.forward(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        return loss_sum / n, correct / n


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _make_loop(cfg: TrialConfig, data: ImageSet, device: torch.device, model: nn.Module) -> _Loop:
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        model = model.to(device, memory_format=torch.channels_last)
    else:
        model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("model: no trainable parameters")
    t, o = cfg.train, cfg.optim
    n_train = data.train_x.shape[0]
    # Drop the last partial batch (as DataLoader(drop_last=True)): the shuffle changes every epoch,
    # and a 1-image batch would break BatchNorm. A set smaller than one batch is one batch.
    n_batches = max(1, n_train // t.batch_size)
    steps_per_epoch = math.ceil(n_batches / t.accum_steps)
    optimizer = OPTIMIZERS[o.name](params, o, cuda)
    gen = torch.Generator(device=device)
    gen.manual_seed(t.seed)
    return _Loop(
        cfg=cfg, model=model,
        forward=torch.compile(model) if cuda and t.compile else model,
        params=params, optimizer=optimizer,
        schedule=SCHEDULERS[o.scheduler](optimizer, o, t.epochs, steps_per_epoch),
        criterion=nn.CrossEntropyLoss(label_smoothing=o.label_smoothing),
        gen=gen,
        # no-ops when the caller already keeps the set on the device (the study does)
        train_x=data.train_x.to(device), train_y=data.train_y.to(device),
        val_x=data.val_x.to(device), val_y=data.val_y.to(device),
        cuda=cuda, n_batches=n_batches,
    )


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", leave=False, dynamic_ncols=True)


def _run(cfg: TrialConfig, data: ImageSet, device: torch.device,
         on_epoch_end: Callable[[EpochStats], None] | None, model: nn.Module | None,
         progress: bool) -> FitResult:
    check_optim(cfg.optim)
    if data.train_x.shape[0] == 0 or data.val_x.shape[0] == 0:
        raise UserError(f"data: {data.train_x.shape[0]} training and {data.val_x.shape[0]} "
                        "validation images; both must be at least 1")
    torch.manual_seed(cfg.train.seed)  # weight init and dropout
    if model is None:
        model = build_model(cfg.model, len(data.classes), data.image_size)
    loop = _make_loop(cfg, data, device, model)
    epochs = cfg.train.epochs
    history: list[EpochStats] = []
    best_epoch, best_acc, best_state = 0, 0.0, None
    loop.bar = _progress_bar(progress, epochs * loop.n_batches)
    try:
        for epoch in range(1, epochs + 1):
            if loop.bar is not None:
                loop.bar.set_description(f"epoch {epoch}/{epochs}")
            start = time.perf_counter()
            lr = float(loop.optimizer.param_groups[0]["lr"])  # a Python float: no sync
            train_loss_t = loop.train_epoch()
            val_loss_t, val_acc_t = loop.evaluate()
            # The one device->host sync of the epoch: read its losses and accuracy together.
            train_loss, val_loss, val_acc = torch.stack([train_loss_t, val_loss_t, val_acc_t]).tolist()
            if not math.isfinite(train_loss) or not math.isfinite(val_loss):
                which = "training" if not math.isfinite(train_loss) else "validation"
                return FitResult("non_finite", history, best_epoch, best_acc, best_state,
                                 reason=f"non-finite {which} loss at epoch {epoch}")
            loop.schedule.after_epoch(val_loss)
            stats = EpochStats(epoch, train_loss, val_loss, val_acc, time.perf_counter() - start, lr)
            history.append(stats)
            if best_epoch == 0 or val_acc > best_acc:
                best_epoch, best_acc, best_state = epoch, val_acc, _cpu_copy(loop.model)
            if loop.bar is not None:
                loop.bar.set_postfix(val_acc=f"{val_acc:.3f}", refresh=False)
            if on_epoch_end is not None:
                on_epoch_end(stats)  # may raise (the study's TrialPruned): it propagates unchanged
    finally:
        if loop.bar is not None:
            loop.bar.close()
    return FitResult("completed", history, best_epoch, best_acc, best_state)


def fit(
    cfg: TrialConfig,
    data: ImageSet,
    device: torch.device,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    model: nn.Module | None = None,
    progress: bool = False,
) -> FitResult:
    """Train ``cfg`` on ``data`` for cfg.train.epochs epochs on ``device``; keep the best epoch.

    Builds the model from cfg.model unless ``model`` is given. Seeded from cfg.train.seed: the
    same config, data and seed on the CPU give the same history. A non-finite loss ends the run
    (status "non_finite"). Exceptions from ``on_epoch_end`` and CUDA out-of-memory errors
    propagate unchanged.
    """
    try:
        return _run(cfg, data, device, on_epoch_end, model, progress)
    except torch.cuda.OutOfMemoryError as exc:
        # The traceback's frames hold the model, optimizer state and batches; drop their locals
        # so the caller can free the device memory while it handles the error.
        traceback.clear_frames(exc.__traceback__)
        raise

