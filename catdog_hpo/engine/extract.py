"""Batched inference through a backbone: its pooled features, in the fastest layout. No Optuna here.

Below ``engine.heads`` (which caches the features of a frozen backbone) and ``engine.transfer``
(whose ImageNet sanity check runs the same pass), so neither imports the other for it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from catdog_hpo.engine.augment import augment_batch, normalize_batch

if TYPE_CHECKING:
    from catdog_hpo.config import TrialConfig

# Images per backbone forward during extraction. On a 2-core CPU small batches stay in cache:
# EfficientNet-Lite0 at 224 px, channels_last, ran 25 img/s at 64, 53 at 32, 125-158 at 4-8.
EXTRACT_BATCH = {"cpu": 8, "cuda": 256}


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
