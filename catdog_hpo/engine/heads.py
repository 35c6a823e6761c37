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
  fit_frozen(cfg, data, device, cache_dir, on_epoch_end, progress)   fit() for this path
No Optuna here.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from catdog_hpo.config import TRANSFER_FAMILIES, TrialConfig, to_dict
from catdog_hpo.data import ImageSet
from catdog_hpo.engine.augment import augment_batch, normalize_batch
from catdog_hpo.engine.regularize import with_l1

FEATURE_VERSION = 1  # bump when extraction changes: old feature files are then simply not found
VIEW_SEED = 1234  # seed of the cached augmented views (fixed: the views are part of the cache)
VIEW_KEYS = ("crop", "flip", "color_jitter", "strength")  # the AugmentConfig keys augment_batch reads
# Images per backbone forward during extraction. On a 2-core CPU small batches stay in cache:
# EfficientNet-Lite0 at 224 px, channels_last, ran 25 img/s at 64, 53 at 32, 125-158 at 4-8.
EXTRACT_BATCH = {"cpu": 8, "cuda": 256}
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


@torch.inference_mode()
def extract(model: nn.Module, images: torch.Tensor, device: torch.device, cfg: TrialConfig | None,
            seed: int) -> torch.Tensor:
    """Backbone features (N x F, float32, CPU) of uint8 ``images``: plain when ``cfg`` is None,
    else augmented with cfg.augment from a generator seeded with ``seed``."""
    model.eval()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    batch = EXTRACT_BATCH.get(device.type, EXTRACT_BATCH["cpu"])
    out = []
    with nhwc(model):
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch].to(device)
            x = normalize_batch(x) if cfg is None else augment_batch(x, cfg.augment, gen)
            out.append(model.features(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out)


@contextmanager
def nhwc(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in NHWC (channels_last) layout for a batched inference pass, plain again after:
    about 2x the NCHW rate of EfficientNet's depthwise convs on the CPU, cuDNN's fastest on CUDA.
    The weights a trial saves stay NCHW."""
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


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
               on_epoch_end: Callable[[Any], None] | None, progress: bool) -> Any:
    """``train.fit`` for a frozen backbone: the same FitResult (best_state holds the whole model:
    backbone weights unchanged, the best epoch's head), trained on cached features."""
    from catdog_hpo.engine.models import build_model

    model = build_model(cfg.model, len(data.classes), data.image_size)
    feats = load_features(cfg, data, device, cache_dir, model)
    return fit_head(cfg, model, feats, device, on_epoch_end, progress)


def fit_head(cfg: TrialConfig, model: nn.Module, feats: FeatureSet, device: torch.device,
             on_epoch_end: Callable[[Any], None] | None, progress: bool = False) -> Any:
    """Train ``model.fc`` on ``feats`` for cfg.train.epochs epochs; keep the best epoch. Seeded
    like fit (call it after torch.manual_seed, as fit does). ``progress`` is accepted for fit's
    signature; there is no bar: an epoch takes milliseconds."""
    from catdog_hpo.engine.train import OPTIMIZERS, SCHEDULERS, EpochStats, FitResult

    t, o = cfg.train, cfg.optim
    head = model.fc.to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    train_f, train_y = feats.train.to(device), feats.train_y.to(device)
    val_f, val_y = feats.val.to(device), feats.val_y.to(device)
    views, n = train_f.shape[0], train_f.shape[1]
    n_batches = max(1, n // t.batch_size)  # drop the last partial batch, as train.fit does
    optimizer = OPTIMIZERS[o.name](params, o, device.type == "cuda")
    schedule = SCHEDULERS[o.scheduler](optimizer, o, t.epochs, math.ceil(n_batches / t.accum_steps))
    criterion = with_l1(nn.CrossEntropyLoss(label_smoothing=o.label_smoothing), params, o.l1)
    gen = torch.Generator(device=device)
    gen.manual_seed(t.seed)
    history: list[EpochStats] = []
    best_epoch, best_acc, best_head = 0, 0.0, None
    for epoch in range(1, t.epochs + 1):
        start = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        head.train()
        perm = torch.randperm(n, device=device, generator=gen)
        # one view per image per epoch (view 0 is the plain image)
        view = torch.randint(views, (n,), device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        for b in range(n_batches):
            idx = perm[b * t.batch_size:(b + 1) * t.batch_size]
            loss = criterion(head(train_f[view[idx], idx]), train_y[idx])
            (loss / t.accum_steps).backward()
            loss_sum += loss.detach()
            if (b + 1) % t.accum_steps == 0 or b + 1 == n_batches:
                if t.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.after_step()
        head.eval()
        with torch.no_grad():
            logits = head(val_f)
            val_loss_t = F.cross_entropy(logits, val_y)
            val_acc_t = (logits.argmax(1) == val_y).float().mean()
        train_loss, val_loss, val_acc = torch.stack([loss_sum / n_batches, val_loss_t, val_acc_t]).tolist()
        if not math.isfinite(train_loss) or not math.isfinite(val_loss):
            which = "training" if not math.isfinite(train_loss) else "validation"
            return FitResult("non_finite", history, best_epoch, best_acc, _whole(model, best_head),
                             reason=f"non-finite {which} loss at epoch {epoch}")
        schedule.after_epoch(val_loss)
        stats = EpochStats(epoch, train_loss, val_loss, val_acc, time.perf_counter() - start, lr)
        history.append(stats)
        if best_epoch == 0 or val_acc > best_acc:
            best_epoch, best_acc = epoch, val_acc
            best_head = {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}
        if on_epoch_end is not None:
            on_epoch_end(stats)  # may raise (the study's TrialPruned): it propagates unchanged
    return FitResult("completed", history, best_epoch, best_acc, _whole(model, best_head))


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
