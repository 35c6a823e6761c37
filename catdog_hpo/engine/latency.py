"""Inference latency of a model: batch-1 forward time in milliseconds, median of repeated runs.

No Optuna here. The model is built from its config with random weights (latency does not depend
on the weight values, and nothing is downloaded), put in eval mode, and timed under
``torch.inference_mode`` in float32 on the device it would ship to (the CPU by default). A few
warm-up forwards run first (allocator, cuDNN autotuning, lazy init); the median of the timed
runs is robust to the odd slow run a busy machine adds. The ``method`` string records all of this
beside the number, so a latency is never read without knowing how it was taken. A model with
test-time flip averaging (``engine.tta.FlipAverage``, as shipped with ``augment.tta``) is timed
whole, both forwards, and its method says so.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from catdog_hpo.config import ModelConfig
from catdog_hpo.engine.tta import FlipAverage, with_tta

REPEATS = 30  # timed forwards (fewer when MAX_SECONDS runs out first)
WARMUP = 5  # untimed forwards before timing
MAX_SECONDS = 3.0  # time budget for the timed runs of one model: a big model on a slow CPU stops early
MIN_REPEATS = 5  # ... but never fewer than this many timed runs
# CPU threads while timing. One: measured on a 2-core machine shared with training, two threads
# gave a first measurement of 60 ms and later ones of 0.3 ms for the same model (OpenMP threads
# waiting on a descheduled peer); one thread gave 0.14-0.23 ms every time. Several cores at
# deployment are faster than this number, not slower.
CPU_THREADS = 1


@dataclass(frozen=True)
class Latency:
    ms: float  # median batch-1 forward time, milliseconds
    repeats: int  # timed runs the median is over
    device: str  # where it ran ("cpu", "cuda:0")
    method: str  # how it was measured, in words

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_model(model: nn.Module, image_size: int, device: torch.device, repeats: int = REPEATS,
                  warmup: int = WARMUP, max_seconds: float = MAX_SECONDS, threads: int = CPU_THREADS) -> Latency:
    """Median batch-1 forward time of ``model`` on ``device`` (the model is moved there)."""
    assert repeats >= 1 and warmup >= 0
    if device.type == "cpu":
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return _measure(model, image_size, device, repeats, warmup, max_seconds)
        finally:
            torch.set_num_threads(previous)
    return _measure(model, image_size, device, repeats, warmup, max_seconds)


def _measure(model: nn.Module, image_size: int, device: torch.device, repeats: int, warmup: int,
             max_seconds: float) -> Latency:
    model = model.to(device).eval()
    x = torch.randn(1, 3, image_size, image_size, device=device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)  # a CUDA forward returns before the kernels finish

    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - t0) * 1000.0)  # ms
            if len(times) >= MIN_REPEATS and time.perf_counter() - started > max_seconds:
                break
    n = torch.get_num_threads()
    threads = f", {n} CPU thread{'s' if n != 1 else ''}" if device.type == "cpu" else ""
    tta = ", test-time flip averaging (2 network forwards)" if isinstance(model, FlipAverage) else ""
    method = (f"batch-1 forward{tta}, {image_size}x{image_size} px, float32, eval mode, torch.inference_mode, "
              f"median of {len(times)} timed runs after {warmup} warm-up, on {device}{threads}; "
              f"torch {torch.__version__}")
    return Latency(ms=round(statistics.median(times), 4), repeats=len(times), device=str(device), method=method)


def measure_config(cfg: ModelConfig, num_classes: int, image_size: int, device: torch.device,
                   repeats: int = REPEATS, warmup: int = WARMUP, tta: bool = False) -> Latency:
    """Latency of the architecture ``cfg`` describes (random weights: no download, nothing frozen),
    as shipped: with ``tta`` (augment.tta) wrapped in the flip average the exported files hold."""
    from catdog_hpo.engine.models import build_model

    arch = dataclasses.replace(cfg, pretrained=False, weights_file="", freeze_backbone=False)
    model = with_tta(build_model(arch, num_classes, image_size), tta)
    try:
        return measure_model(model, image_size, device, repeats=repeats, warmup=warmup)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
