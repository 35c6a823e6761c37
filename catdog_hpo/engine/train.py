"""fit(): one training run of a TrialConfig on an ImageSet, airbench-style. No Optuna here.

The hot loop: the decoded uint8 images live on the training device; every epoch is one
``randperm`` on the device, then chunks of many batches each augmented in one batched call on
the device, and per batch forward, loss, backward, step (on CUDA one replay of a captured
graph: ``engine.graphstep``). Validation is normalised once per trial and runs in fp32. Losses
and the correct count accumulate in device tensors and are read ONCE per epoch; that read is
where ``on_epoch_end`` runs (the study reports and prunes there).

What happens around an epoch (history, best epoch, that one sync, a non-finite loss) is
``engine.epochs.run_epochs``, shared with the head-only path (``engine.heads``); the optimizer
and scheduler registries are ``engine.optim``'s.
"""

from __future__ import annotations

import contextlib
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from catdog_hpo.config import TrialConfig, check_optim
from catdog_hpo.data import ImageSet
from catdog_hpo.engine import heads, resume
from catdog_hpo.engine.augment import augment_batch, normalize_batch
from catdog_hpo.engine.ema import WeightEMA, averaged
from catdog_hpo.engine.epochs import EpochEndGuard, EpochStats, FitResult, Progress, run_epochs
from catdog_hpo.engine.optim import OPTIMIZERS, SCHEDULERS, Schedule
from catdog_hpo.engine.regularize import with_l1
from catdog_hpo.engine.tta import tta_forward
from catdog_hpo.engine.graphstep import GRAPH_OPTIMIZERS, StaticStep, graph_optimizer
from catdog_hpo.engine.mix import mix_batch
from catdog_hpo.engine.runtime import VAL_RESIDENT_VALUES, Runtime, apply_backends, for_device, val_batch_size
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.engine.models import build_model


# --------------------------------------------------------------------------- the loop


@dataclass
class _Loop:
    """Everything one epoch needs, on the device."""

    cfg: TrialConfig
    rt: Runtime
    model: nn.Module  # the module itself (its state_dict is what we keep)
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its torch.compile'd wrapper
    params: list[nn.Parameter]  # the trainable ones
    optimizer: Any  # a torch optimizer, or graphstep.ForeachSGD on the static path
    schedule: Schedule  # on the static path it drives ``shadow``, whose lr is copied to ``lr_tensor``
    criterion: nn.Module
    gen: torch.Generator  # on the device: shuffling and augmentation
    train_x: torch.Tensor  # uint8
    train_y: torch.Tensor
    val_n: torch.Tensor  # normalised float32 once per trial (uint8 if too big), padded to whole val batches
    val_y: torch.Tensor  # padding labelled -100: ignored by the loss, never equal to an argmax
    n_val: int
    val_batch: int
    n_batches: int  # training batches per epoch
    capture: bool  # capture the static step in a CUDA graph
    classes: int  # classes of the data: the width of mixed (soft) targets
    shadow: torch.optim.Optimizer | None = None  # static path: the optimizer the schedule steps
    lr_tensor: torch.Tensor | None = None  # static path: the device lr the step reads
    step: StaticStep | None = None  # static path: made at the first batch (it needs the shape)
    ema: WeightEMA | None = None  # train.ema > 0: the average validated and kept in place of the weights
    bar: Any = field(default=None)  # tqdm bar or None
    _lr_set: float = math.nan  # the value last written into lr_tensor

    def lr(self) -> float:
        """The current learning rate as a Python float (no sync: the schedule keeps floats)."""
        source = self.shadow if self.shadow is not None else self.optimizer
        return float(source.param_groups[0]["lr"])

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.rt.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.train_x.device.type, dtype=self.rt.autocast)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last (NHWC) lets cuDNN and oneDNN (CPU) use their fastest convolution kernels
        return x.contiguous(memory_format=torch.channels_last) if self.rt.channels_last else x

    def _set_lr(self) -> None:
        lr = self.lr()
        if lr != self._lr_set:  # fill_ with a Python float: a kernel argument, not a host copy
            self.lr_tensor.fill_(lr)
            self._lr_set = lr

    def train_epoch(self) -> torch.Tensor:
        """One pass over the shuffled training set; returns the mean loss as a device scalar."""
        t = self.cfg.train
        bs = t.batch_size
        self.model.train()
        dev = self.train_x.device
        perm = torch.randperm(self.train_x.shape[0], device=dev, generator=self.gen)
        loss_sum = torch.zeros((), device=dev)
        # Augment many batches at once (one batched augmentation per chunk, not per step: the
        # launches of augmentation were a third of a step's); a chunk is bounded in values, and
        # on a GPU shared by K workers to 1/K of them (each worker's share of the memory).
        chunk_values = self.rt.aug_chunk_values // self.rt.gpu_workers
        per_chunk = max(1, chunk_values // (bs * self.train_x[0].numel()))
        for c in range(0, self.n_batches, per_chunk):
            nb = min(per_chunk, self.n_batches - c)
            idx = perm[c * bs:(c + nb) * bs]
            # index_select, not x[idx]: advanced indexing copies uint8 images element by element
            # on the CPU (about 25x slower, measured in bench/pipeline.py).
            xs = augment_batch(self.train_x.index_select(0, idx), self.cfg.augment, self.gen)
            # mixup/cutmix (augment.mix): soft B x C targets for the whole trial; "none": untouched
            xs, ys = mix_batch(xs, self.train_y.index_select(0, idx), self.classes, self.cfg.augment, self.gen)
            xs = self._layout(xs)
            for j in range(nb):
                x, y = xs[j * bs:(j + 1) * bs], ys[j * bs:(j + 1) * bs]  # views: no copy
                if self.shadow is not None:
                    self._static_step(x, y)
                else:
                    loss_sum += self._eager_step(x, y, c + j)  # stays on the device: no sync per step
                if self.bar is not None:
                    self.bar.update(1)
        if self.step is not None:
            loss_sum += self.step.take_loss_sum()
        return loss_sum / self.n_batches

    def _static_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.step is None:
            self.step = StaticStep(self.forward, self.criterion, self.optimizer, self.params,
                                   self.cfg.train.grad_clip, self.rt.autocast, x, y, self.capture)
        self._set_lr()
        self.step(x, y)
        if self.ema is not None:  # after the replay, outside the captured graph
            self.ema.update()
        self.shadow.step()  # no parameters with grads: only tells the scheduler a step happened
        self.schedule.after_step()

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor, b: int) -> torch.Tensor:
        t = self.cfg.train
        with self._autocast():
            loss = self.criterion(self.forward(x), y)
        (loss / t.accum_steps).backward()  # accumulated gradients average over the accum_steps batches
        if (b + 1) % t.accum_steps == 0 or b + 1 == self.n_batches:
            if t.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.params, t.grad_clip)  # no host sync
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.after_step()
        return loss.detach()

    def after_epoch(self, val_loss: float) -> None:
        self.schedule.after_epoch(val_loss)
        if self.shadow is not None:
            self._set_lr()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return _cpu_copy(self.ema or self.model)  # what validation scored: the average with train.ema

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean plain cross-entropy, accuracy) on the validation set, as device scalars.

        In fp32, without autocast: bf16 logits round the loss and send argmax ties to class 0,
        while retrain, predict and the exports are fp32. Fixed-shape batches (the last padded).
        train.ema: the average is evaluated; augment.tta: the mean logits of image and mirror."""
        self.model.eval()
        logits_of = tta_forward(lambda v: self.forward(v).float(), self.cfg.augment.tta)
        loss_sum = torch.zeros((), device=self.val_n.device)
        correct = torch.zeros((), device=self.val_n.device)
        with averaged(self.ema):
            for i in range(0, self.val_n.shape[0], self.val_batch):
                y = self.val_y[i:i + self.val_batch]
                x = self.val_n[i:i + self.val_batch]
                if x.dtype == torch.uint8:  # a val set too big to keep normalised
                    x = self._layout(normalize_batch(x))
                logits = logits_of(x)
                loss_sum += F.cross_entropy(logits, y, reduction="sum", ignore_index=-100)
                correct += (logits.argmax(1) == y).sum()
        return loss_sum / self.n_val, correct / self.n_val


def _cpu_copy(model: nn.Module | WeightEMA) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _validation(data: ImageSet, device: torch.device, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(normalised val images padded to whole batches, labels padded with -100, batch size)."""
    x, y = data.val_x.to(device), data.val_y.to(device)
    n = x.shape[0]
    batch = val_batch_size(n, x[0].numel())
    pad = -n % batch
    resident = VAL_RESIDENT_VALUES // rt.gpu_workers  # values; a shared GPU: this worker's share
    xn = normalize_batch(x) if x.numel() <= resident else x
    if pad:
        xn = torch.cat([xn, xn.new_zeros((pad, *xn.shape[1:]))])
        y = torch.cat([y, y.new_full((pad,), -100)])
    if xn.dtype == torch.uint8:
        return xn, y, batch
    return (xn.contiguous(memory_format=torch.channels_last) if rt.channels_last else xn), y, batch


def _make_loop(cfg: TrialConfig, data: ImageSet, device: torch.device, model: nn.Module, rt: Runtime) -> _Loop:
    apply_backends(rt, device)
    if rt.channels_last:
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
    # A transfer model with backbone_lr_ratio != 1 gets two lr groups (head, backbone): eager step.
    from catdog_hpo.engine.transfer import param_groups  # lazy: imports torchvision

    groups = param_groups(model, params, o.lr, getattr(cfg.model, "backbone_lr_ratio", 1.0))
    static = (rt.static_step and o.name in GRAPH_OPTIMIZERS and t.accum_steps == 1
              and rt.compile_backend is None and groups is params)
    capture = static and rt.cuda_graph and device.type == "cuda"
    shadow = lr_tensor = None
    if static:
        optimizer, lr_tensor = graph_optimizer(params, o, device, rt.fused)
        shadow = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
        schedule = SCHEDULERS[o.scheduler](shadow, o, t.epochs, steps_per_epoch)
    else:
        optimizer = OPTIMIZERS[o.name](groups, o, rt.fused)
        schedule = SCHEDULERS[o.scheduler](optimizer, o, t.epochs, steps_per_epoch)
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if rt.compile_backend is not None:
        # A fresh dynamo cache per trial: each trial's new model would otherwise count as a
        # recompile of the same code, and the 8-entry limit silently turns later trials eager.
        torch._dynamo.reset()
        forward = torch.compile(model, backend=rt.compile_backend, dynamic=False)  # fixed shapes
    gen = torch.Generator(device=device)
    gen.manual_seed(t.seed)
    val_n, val_y, val_batch = _validation(data, device, rt)
    return _Loop(  # optim.l1 wraps the criterion: the eager and the static step add it alike
        cfg=cfg, rt=rt, model=model, forward=forward, params=params, optimizer=optimizer,
        schedule=schedule, criterion=with_l1(nn.CrossEntropyLoss(label_smoothing=o.label_smoothing), params, o.l1),
        gen=gen, ema=WeightEMA(model, t.ema) if t.ema > 0 else None,  # after the move: the device tensors
        # no-ops when the caller already keeps the set on the device (the study does)
        train_x=data.train_x.to(device), train_y=data.train_y.to(device),
        val_n=val_n, val_y=val_y, n_val=int(data.val_x.shape[0]), val_batch=val_batch,
        n_batches=n_batches, capture=capture, classes=len(data.classes), shadow=shadow, lr_tensor=lr_tensor,
    )


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", leave=False, dynamic_ncols=True)


def _run(cfg: TrialConfig, data: ImageSet, device: torch.device, on_epoch_end: Callable[[EpochStats], None] | None,
         model: nn.Module | None, progress: bool, runtime: Runtime | None, feature_cache: Path | None = None,
         ck: resume.CheckpointSpec = resume.CheckpointSpec(), epoch_end_guard: EpochEndGuard | None = None) -> FitResult:
    check_optim(cfg.optim)
    if data.train_x.shape[0] == 0 or data.val_x.shape[0] == 0:
        raise UserError(f"data: {data.train_x.shape[0]} training and {data.val_x.shape[0]} "
                        "validation images; both must be at least 1")
    torch.manual_seed(cfg.train.seed)  # weight init and dropout
    if model is None and feature_cache is not None and heads.applies(cfg):
        # frozen backbone: train the head on cached backbone features (engine/heads.py). Not
        # checkpointed: its epochs take seconds, and its state is the features' draw as well.
        return heads.fit_frozen(cfg, data, device, feature_cache, on_epoch_end, progress, epoch_end_guard)
    if model is None:
        model = build_model(cfg.model, len(data.classes), data.image_size)
    loop = _make_loop(cfg, data, device, model, runtime or for_device(device, cfg.train))
    epochs = cfg.train.epochs
    start = Progress()
    if ck.resume is not None:  # go on after the saved epoch: weights, optimizer, schedule, random streams
        resume.restore(loop, ck.resume)
        start = Progress([EpochStats(**h) for h in ck.resume.history], ck.resume.best_epoch,
                         ck.resume.best_acc, ck.resume.best_state)
    loop.bar = _progress_bar(progress, epochs * loop.n_batches)
    if loop.bar is not None:
        loop.bar.update(len(start.history) * loop.n_batches)
    try:
        result = run_epochs(loop, epochs, on_epoch_end, start, _saver(ck, loop, epochs), loop.bar, epoch_end_guard)
    finally:
        if loop.bar is not None:
            loop.bar.close()
    if result.status == "completed" and loop.ema is not None:
        loop.ema.copy_to_model()  # the model a caller goes on with (retrain on train+val) is the one validated
    return result


def _saver(ck: resume.CheckpointSpec, loop: _Loop, epochs: int) -> Callable[[int, Progress], None]:
    """What runs after each epoch's report: the checkpoint, when ``ck`` says one is due (after
    the report, so a pruned epoch is not saved). A failed write stops the saving, not the fit."""
    newest = ck.resume.source if ck.resume is not None else None  # the next save goes to its twin
    saving = True

    def after_report(epoch: int, p: Progress) -> None:
        nonlocal newest, saving
        if saving and ck.due(epoch, epochs):
            newest = resume.save(ck, loop, epoch, p.history, (p.best_epoch, p.best_acc, p.best_state), newest)
            saving = newest is not None

    return after_report


def fit(
    cfg: TrialConfig,
    data: ImageSet,
    device: torch.device,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    model: nn.Module | None = None,
    progress: bool = False,
    runtime: Runtime | None = None,
    feature_cache: Path | None = None,
    checkpoint: resume.CheckpointSpec | None = None,
    epoch_end_guard: EpochEndGuard | None = None,
) -> FitResult:
    """Train ``cfg`` on ``data`` for cfg.train.epochs epochs on ``device``; keep the best epoch.

    Builds the model from cfg.model unless ``model`` is given. ``runtime``: the device settings
    (``engine.runtime``; default: ``for_device``). Seeded from cfg.train.seed: the same config,
    data, seed and runtime give the same history on the CPU, and on CUDA only after
    ``configure_process(deterministic=True)`` (``--deterministic``). A non-finite loss ends the
    run (status "non_finite"). Exceptions (from ``on_epoch_end``, CUDA errors) propagate
    unchanged, with the locals of fit's frames dropped so the model's memory can be freed.
    ``feature_cache``: the cache folder; with it, a frozen-backbone transfer config trains only
    its head on cached backbone features (``engine.heads``), seconds instead of minutes.
    ``checkpoint`` (``engine.resume``): save the training state at epoch ends, and go on from a
    saved one; the history then holds the saved epochs too, and ``on_epoch_end`` sees only new ones.
    ``epoch_end_guard()`` (``engine.epochs.EpochEndGuard``): what each epoch's report and save run inside.
    ``train.ema``: validation, ``best_state`` and a completed fit's model are the weights' average;
    ``augment.tta``: validation flip-averages (engine/ema.py, tta.py; the head-only path ignores both).
    """
    try:
        return _run(cfg, data, device, on_epoch_end, model, progress, runtime, feature_cache,
                    checkpoint or resume.CheckpointSpec(), epoch_end_guard)
    except Exception as exc:  # out of memory, a CUDA error, a prune: the caller handles it
        # The traceback's frames hold the model, optimizer state and batches; drop their locals
        # so the caller can free the device memory while it handles the error.
        traceback.clear_frames(exc.__traceback__)
        raise

