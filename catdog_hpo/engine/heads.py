"""The frozen-backbone fast path: backbone features computed once, cached on disk, head trained on them.

When a transfer model's whole backbone is frozen (``freeze_backbone`` with ``unfreeze_stages``
0, and trained weights), the backbone is a fixed function in eval mode (engine/transfer.py keeps
frozen BatchNorm in eval mode), so its pooled features of an image never change. They are
computed once per (images, image size, backbone weights, augmentation) and saved beside the image
cache (``features-<family>-<size>px-<fingerprint>.pt``, the image cache's keying plus the weights
file's identity); a trial then trains only the head on B x F feature rows: seconds on a CPU.

Augmentation: a frozen backbone cannot see fresh random crops every epoch without recomputing
features, so the cache holds ``train.feature_views`` views per training image: view 0 is the
plain image, views 1.. are augmented (``augment_batch`` with the trial's augmentation, a fixed
seed). Every epoch each training image contributes one of its views, drawn at random. With the
augmentation off (crop none, no flip, no jitter) there is one view. Validation uses plain images.
Mixing (``augment.mix``, engine/mix.py) is ignored here: a mixed image's features would have to
be extracted anew every epoch, which is what this path exists to avoid.

Public API:
  applies(cfg)                                  True when a trial can take this path
  load_features(cfg, data, device, cache_dir)   the cached FeatureSet (extracting it if needed)
  fit_frozen(cfg, data, device, cache_dir, on_epoch_end, progress, epoch_end_guard)   fit() for this path
No Optuna here.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from catdog_hpo.config import TRANSFER_FAMILIES, TrialConfig, to_dict
from catdog_hpo.data import ImageSet
from catdog_hpo.engine.epochs import EpochEndGuard, EpochStats, FitResult, run_epochs
from catdog_hpo.engine.extract import extract
from catdog_hpo.engine.optim import OPTIMIZERS, SCHEDULERS, Schedule
from catdog_hpo.engine.regularize import with_l1

FEATURE_VERSION = 1  # bump when extraction changes: old feature files are then simply not found
VIEW_SEED = 1234  # seed of the cached augmented views (fixed: the views are part of the cache)
VIEW_KEYS = ("crop", "flip", "color_jitter", "strength")  # the AugmentConfig keys augment_batch reads
_MEMO_SIZE = 4  # feature sets kept in this process (one per image size / augmentation in use)
_MEMO: OrderedDict[str, FeatureSet] = OrderedDict()


@dataclass
class FeatureSet:
    train: torch.Tensor  # float32, V x N x F: V views of each training image (view 0 plain)
    train_y: torch.Tensor  # int64, N
    val: torch.Tensor  # float32, M x F (plain images)
    val_y: torch.Tensor  # int64, M
    seconds: float  # extraction time (0 when read from the cache)
    path: Path | None  # the cache file, None when it could not be written


def applies(cfg: TrialConfig) -> bool:
    """A frozen backbone with trained weights: only the head trains, features can be cached."""
    m = cfg.model
    return (m.family in TRANSFER_FAMILIES and m.freeze_backbone and m.unfreeze_stages == 0
            and (m.pretrained or bool(m.weights_file)))


def n_views(cfg: TrialConfig) -> int:
    a = cfg.augment
    augmenting = a.crop != "none" or a.flip or a.color_jitter
    return cfg.train.feature_views if augmenting else 1


def feature_key(cfg: TrialConfig, data: ImageSet) -> dict[str, Any]:
    """Everything the cached features depend on (JSON-able)."""
    from catdog_hpo.engine.pretrained import weights_identity
    from catdog_hpo.engine.transfer import weights_source

    path = weights_source(cfg.model)
    views = n_views(cfg)
    return {
        "kind": "features", "v": FEATURE_VERSION, "images": data.fingerprint, "family": cfg.model.family,
        "weights": weights_identity(path) if path is not None else "torchvision:ResNet18_Weights.IMAGENET1K_V1",
        "views": views, "view_seed": VIEW_SEED,
        # only the keys the views depend on (mixing is not applied here): the same files as before
        # augment.mix existed, and one file for every mix setting
        "augment": {k: to_dict(cfg.augment)[k] for k in VIEW_KEYS} if views > 1 else None,
    }


def feature_path(cache_dir: Path, cfg: TrialConfig, data: ImageSet) -> tuple[Path, str]:
    blob = json.dumps({"image_size": data.image_size, **feature_key(cfg, data)}, sort_keys=True)
    fp = hashlib.sha256(blob.encode("utf-8")).hexdigest()
    return cache_dir / f"features-{cfg.model.family}-{data.image_size}px-{fp[:16]}.pt", fp


def _read(path: Path, fp: str, data: ImageSet) -> dict[str, Any] | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, unreadable, other version: extract again and overwrite
        return None
    if not isinstance(payload, dict) or payload.get("fingerprint") != fp:
        return None
    train, val = payload.get("train"), payload.get("val")
    # a set changed in memory under the same fingerprint (retrain's train+val) must not match
    if not (isinstance(train, torch.Tensor) and isinstance(val, torch.Tensor)
            and train.shape[1] == data.train_x.shape[0] and val.shape[0] == data.val_x.shape[0]):
        return None
    return payload


def load_features(cfg: TrialConfig, data: ImageSet, device: torch.device, cache_dir: Path,
                  model: nn.Module | None = None) -> FeatureSet:
    """The features of ``data`` under ``cfg``'s frozen backbone: from this process's memo, the
    disk cache, or extracted now (under the cache lock, so concurrent workers extract once)."""
    from catdog_hpo.data import cache
    from catdog_hpo.engine.models import build_model

    path, fp = feature_path(Path(cache_dir), cfg, data)
    memo = _MEMO.get(fp)
    if memo is not None and memo.train.shape[1] == data.train_x.shape[0] and memo.val.shape[0] == data.val_x.shape[0]:
        _MEMO.move_to_end(fp)
        return memo
    payload = _read(path, fp, data)
    seconds = 0.0
    if payload is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # cache.locked is best effort; the write below warns
        with cache.locked(path):
            payload = _read(path, fp, data)  # another worker may have extracted it meanwhile
            if payload is None:
                start = time.perf_counter()
                if model is None:
                    model = build_model(cfg.model, len(data.classes), data.image_size)
                model = model.to(device)
                views = [extract(model, data.train_x, device, None, 0)]
                views += [extract(model, data.train_x, device, cfg, VIEW_SEED + v) for v in range(1, n_views(cfg))]
                payload = {"fingerprint": fp, "key": json.dumps(feature_key(cfg, data)),
                           "train": torch.stack(views), "val": extract(model, data.val_x, device, None, 0)}
                seconds = time.perf_counter() - start
                try:
                    cache.write(path, payload)
                except OSError as exc:
                    warnings.warn(f"cannot write the feature cache {path} ({exc}); it will be extracted again",
                                  stacklevel=2)
    feats = FeatureSet(payload["train"], data.train_y.cpu(), payload["val"], data.val_y.cpu(), seconds, path)
    _MEMO[fp] = feats
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return feats


def fit_frozen(cfg: TrialConfig, data: ImageSet, device: torch.device, cache_dir: Path,
               on_epoch_end: Callable[[EpochStats], None] | None, progress: bool,
               epoch_end_guard: EpochEndGuard | None = None) -> FitResult:
    """``train.fit`` for a frozen backbone: the same FitResult (best_state holds the whole model:
    backbone weights unchanged, the best epoch's head), trained on cached features."""
    from catdog_hpo.engine.models import build_model

    model = build_model(cfg.model, len(data.classes), data.image_size)
    feats = load_features(cfg, data, device, cache_dir, model)
    return fit_head(cfg, model, feats, device, on_epoch_end, progress, epoch_end_guard)


def fit_head(cfg: TrialConfig, model: nn.Module, feats: FeatureSet, device: torch.device,
             on_epoch_end: Callable[[EpochStats], None] | None, progress: bool = False,
             epoch_end_guard: EpochEndGuard | None = None) -> FitResult:
    """Train ``model.fc`` on ``feats`` for cfg.train.epochs epochs; keep the best epoch. Seeded
    like fit (call it after torch.manual_seed, as fit does). ``progress`` is accepted for fit's
    signature; there is no bar: an epoch takes milliseconds. The epochs run in fit's own loop
    (``engine.epochs.run_epochs``); only what an epoch trains differs."""
    t, o = cfg.train, cfg.optim
    head = model.fc.to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    n_batches = max(1, feats.train.shape[1] // t.batch_size)  # drop the last partial batch, as train.fit does
    optimizer = OPTIMIZERS[o.name](params, o, device.type == "cuda")
    gen = torch.Generator(device=device)
    gen.manual_seed(t.seed)
    loop = _HeadLoop(
        cfg=cfg, head=head, params=params, optimizer=optimizer,
        schedule=SCHEDULERS[o.scheduler](optimizer, o, t.epochs, math.ceil(n_batches / t.accum_steps)),
        criterion=with_l1(nn.CrossEntropyLoss(label_smoothing=o.label_smoothing), params, o.l1), gen=gen,
        train_f=feats.train.to(device), train_y=feats.train_y.to(device),
        val_f=feats.val.to(device), val_y=feats.val_y.to(device), n_batches=n_batches)
    result = run_epochs(loop, t.epochs, on_epoch_end, epoch_end_guard=epoch_end_guard)
    # the runner kept the head's weights (a copy of the backbone each best epoch would be wasted)
    result.best_state = _whole(model, result.best_state)
    return result


@dataclass
class _HeadLoop:
    """fit_head's side of the epoch runner (engine.epochs.EpochLoop): the head on feature rows."""

    cfg: TrialConfig
    head: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    criterion: nn.Module
    gen: torch.Generator  # on the device: shuffling and the view drawn per image
    train_f: torch.Tensor  # float32, V x N x F
    train_y: torch.Tensor
    val_f: torch.Tensor  # float32, M x F
    val_y: torch.Tensor
    n_batches: int

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_epoch(self) -> torch.Tensor:
        t = self.cfg.train
        views, n = self.train_f.shape[0], self.train_f.shape[1]
        device = self.gen.device  # the training device, as fit_head was given it
        self.head.train()
        perm = torch.randperm(n, device=device, generator=self.gen)
        # one view per image per epoch (view 0 is the plain image)
        view = torch.randint(views, (n,), device=device, generator=self.gen)
        loss_sum = torch.zeros((), device=device)
        for b in range(self.n_batches):
            idx = perm[b * t.batch_size:(b + 1) * t.batch_size]
            loss = self.criterion(self.head(self.train_f[view[idx], idx]), self.train_y[idx])
            (loss / t.accum_steps).backward()
            loss_sum += loss.detach()
            if (b + 1) % t.accum_steps == 0 or b + 1 == self.n_batches:
                if t.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.params, t.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.schedule.after_step()
        return loss_sum / self.n_batches

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.head.eval()
        logits = self.head(self.val_f)
        return F.cross_entropy(logits, self.val_y), (logits.argmax(1) == self.val_y).float().mean()

    def after_epoch(self, val_loss: float) -> None:
        self.schedule.after_epoch(val_loss)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.head.state_dict().items()}


def _whole(model: nn.Module, head_state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict (CPU) with the given head weights."""
    if head_state is None:
        return None
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if not k.startswith("fc.")}
    state.update({f"fc.{k}": v for k, v in head_state.items()})
    return state


# --------------------------------------------------------------------------- cost model inputs


@dataclass(frozen=True)
class HeadCost:
    flops: int  # forward FLOPs per feature row (2 per multiply-add of the linears)
    params: int
    layers: int  # leaf modules


def head_cost(cfg: TrialConfig, num_classes: int) -> HeadCost:
    """What one epoch of the fast path runs per image: the head alone (engine/cost.py)."""
    from catdog_hpo.engine.transfer import FAMILY_CLASSES, new_head

    with torch.device("meta"):
        head = new_head(cfg.model, FAMILY_CLASSES[cfg.model.family].FEATURES, num_classes)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return HeadCost(flops=sum(2 * m.in_features * m.out_features for m in linears),
                    params=sum(p.numel() for p in head.parameters()),
                    layers=sum(1 for m in head.modules() if not any(True for _ in m.children())))


def features_ready(cfg: TrialConfig, data: ImageSet, cache_dir: Path | None = None) -> bool:
    """True when ``cfg``'s features of ``data`` need no extraction: this process holds them, or
    their file is in ``cache_dir`` (a read of a few MB; the memo keeps only a few sets)."""
    if not applies(cfg):
        return False
    try:
        path, fp = feature_path(Path(cache_dir or "."), cfg, data)
    except Exception:  # e.g. the weights file is missing: training will say so
        return False
    return fp in _MEMO or (cache_dir is not None and path.is_file())
