"""The GPU engine's speed (issue 11): images/s and GPU busy per trial, trials/hour with K workers
on one GPU, and the plain PyTorch loop a user would write. One prepared run, < 8 minutes on a GPU.

Synthetic data generated on the device (uint8 noise, 2 classes; no files): speed does not depend
on what the pixels show. Rows:

1. per trial: the seed-000 CNN (ModelConfig() defaults) at 64 and 128 px and ResNet-18 at 128 px,
   batch 64, Adam, random resized crop + flip, bf16 autocast:
   - engine: the default CUDA runtime (chunked augmentation, CUDA-graph step, fp32 validation);
   - engine eager: the same without the graph-captured step;
   - engine + cudnn.benchmark: the default with cuDNN autotuning (off by default);
   - plain loop: an ImageFolder-like Dataset over in-memory uint8 images, per-image torchvision
     transforms in a DataLoader (4 workers), fp32, per-step ``loss.item()``.
   img/s: training images per second of wall time over the epochs after the first (an epoch
   includes its validation pass); 1st epoch s (graph capture, autotuning); busy: the fraction of
   one steady epoch's wall time in which a kernel or copy ran (torch.profiler, CUDA activity).
   The graph and eager rows train the same seed: their final train losses are printed side by
   side (bf16 rounding aside they must agree: the check that the captured step is the eager one).
2. trials/hour: K = 1, 2, 4, 8 worker processes on GPU 0, each pinned as a run's workers are
   (CUDA_VISIBLE_DEVICES, expandable segments, 2 CPU threads), each running M trials of the
   seed-000 CNN at 64 px after one warm-up trial; wall time from a shared start barrier.

Run: .venv/bin/python bench/gpu.py [--device cuda] [--smoke]   (--device cpu --smoke: seconds)
Targets: >= 50% busy for the seed CNN at 64 px; >= 3x the plain loop's img/s; K=4 >= 2x K=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from catdog_hpo.config import AugmentConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig  # noqa: E402
from catdog_hpo.data import ImageSet  # noqa: E402
from catdog_hpo.engine.runtime import Runtime, configure_process, for_device  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    n_train: int
    n_val: int
    epochs: int  # per throughput run (the first is reported apart)
    plain_images: int  # images the plain loop trains on (one epoch after a warm-up)
    k_values: tuple[int, ...]
    k_trials: int  # trials per worker in the K runs
    k_train: int
    k_epochs: int
    k_size: int  # px of the K runs' trials


FULL = Sizes(n_train=16384, n_val=4096, epochs=3, plain_images=4096, k_values=(1, 2, 4, 8), k_trials=3,
             k_train=8192, k_epochs=2, k_size=64)
SMOKE = Sizes(n_train=64, n_val=32, epochs=2, plain_images=64, k_values=(1, 2), k_trials=1,
              k_train=64, k_epochs=1, k_size=16)


def synthetic(n_train: int, n_val: int, size: int, device: torch.device, seed: int = 0) -> ImageSet:
    g = torch.Generator(device=device).manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 256, (n, 3, size, size), generator=g, device=device, dtype=torch.uint8)
        return x, torch.randint(0, 2, (n,), generator=g, device=device)

    tx, ty = make(n_train)
    vx, vy = make(n_val)
    return ImageSet(tx, ty, vx, vy, ("a", "b"), fingerprint=f"bench-{size}")


def trial_config(family: str, size: int, epochs: int, smoke: bool) -> TrialConfig:
    model = ModelConfig(family=family)
    if smoke and family == "cnn":
        model = dataclasses.replace(model, fc_hidden=32)
    return TrialConfig(image_size=size, model=model, augment=AugmentConfig(crop="resized", flip=True),
                       optim=OptimConfig(name="adam", lr=1e-3, scheduler="cosine"),
                       train=TrainConfig(epochs=epochs, batch_size=64, seed=0))


# --------------------------------------------------------------------------- one trial


def _kernel_busy(prof: Any) -> float:
    """Union of CUDA kernel/copy intervals (us) in a profile."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    total, end = 0.0, -math.inf
    for s, e in spans:
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def engine_run(cfg: TrialConfig, data: ImageSet, device: torch.device, rt: Runtime) -> dict[str, float]:
    """images/s over the epochs after the first, first-epoch seconds, busy fraction of the last
    epoch (profiled on CUDA), final train loss."""
    from catdog_hpo.engine.train import EpochStats, fit

    prof: dict[str, Any] = {}
    cuda = device.type == "cuda"

    def on_epoch_end(stats: EpochStats) -> None:
        if not cuda:
            return
        if stats.epoch == cfg.train.epochs - 1:  # profile the last epoch
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            try:
                p = profile(activities=[ProfilerActivity.CUDA])
                p.__enter__()
            except Exception as exc:  # no CUPTI here: the busy column says n/a
                print(f"(profiler unavailable: {exc})", file=sys.stderr)
                return
            prof["p"], prof["t0"] = p, time.perf_counter()
        elif stats.epoch == cfg.train.epochs and "p" in prof:
            torch.cuda.synchronize()
            wall = time.perf_counter() - prof["t0"]
            prof["p"].__exit__(None, None, None)
            prof["busy"] = _kernel_busy(prof["p"]) / 1e6 / wall

    result = fit(cfg, data, device, on_epoch_end=on_epoch_end, runtime=rt)
    h = result.history
    images = (data.train_x.shape[0] // cfg.train.batch_size) * cfg.train.batch_size
    timed = (h[1:-1] if cuda else h[1:]) or h[-1:]  # not the first, not the profiled (profiler overhead)
    return {"img_s": images * len(timed) / sum(s.seconds for s in timed), "first_s": h[0].seconds,
            "busy": prof.get("busy", math.nan), "loss": h[-1].train_loss}


# --------------------------------------------------------------------------- the plain loop


class _InMemoryFolder(torch.utils.data.Dataset):
    """What ImageFolder gives a user's loop, minus the JPEG decode: one uint8 CHW image per item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int) -> None:
        from torchvision.transforms import v2

        from catdog_hpo.engine.augment import MEAN, STD

        self.x, self.y = x, y
        self.tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                              v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tf(self.x[i]), int(self.y[i])


def plain_loop(cfg: TrialConfig, data: ImageSet, device: torch.device, images: int, workers: int) -> float:
    """images/s of the tutorial loop: DataLoader, fp32, loss.item() every step."""
    from catdog_hpo.engine.models import build_model

    x, y = data.train_x[:images].cpu(), data.train_y[:images].cpu()
    loader = torch.utils.data.DataLoader(
        _InMemoryFolder(x, y, cfg.image_size), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    model = build_model(cfg.model, 2, cfg.image_size).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()

    def epoch() -> int:
        seen = 0
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = crit(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # what every tutorial loop does: a sync per step
            seen += xb.shape[0]
        return seen

    epoch()  # warm-up: workers started, cuDNN handles made
    start = time.perf_counter()
    seen = epoch()
    return seen / (time.perf_counter() - start)


# --------------------------------------------------------------------------- K workers on one GPU


def _k_worker(device: str, shared: bool, sizes: Sizes, smoke: bool, barrier: Any, out: Any) -> None:
    from catdog_hpo.engine.device import pin_worker_device
    from catdog_hpo.engine.train import fit

    device = pin_worker_device(device, shared)  # before any CUDA call, as a run's worker does
    configure_process(device, shared_gpu=shared)
    dev = torch.device(device)
    data = synthetic(sizes.k_train, sizes.k_train // 4, sizes.k_size, dev)
    cfg = trial_config("cnn", sizes.k_size, sizes.k_epochs, smoke)
    fit(cfg, data, dev)  # warm-up trial: CUDA context, cuDNN/cuBLAS handles
    barrier.wait()
    for seed in range(sizes.k_trials):
        fit(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed + 1)), data, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out.put(time.time())


def trials_per_hour(k: int, device: torch.device, sizes: Sizes, smoke: bool) -> float:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(k + 1), ctx.Queue()
    name = "cuda:0" if device.type == "cuda" else "cpu"
    procs = [ctx.Process(target=_k_worker, args=(name, k > 1, sizes, smoke, barrier, out)) for _ in range(k)]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.time()
    ends = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return k * sizes.k_trials / (max(ends) - start) * 3600


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    ap.add_argument("--k", type=int, nargs="+", default=None, metavar="K",
                    help="worker counts for the trials/hour rows (default: 1 2 4 8; smoke: 1 2)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU here (use --device cpu --smoke)", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    configure_process(args.device)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"# bench/gpu.py on {name}, torch {torch.__version__}{' (smoke)' if args.smoke else ''}\n")
    print("| model | px | variant | img/s | 1st epoch s | GPU busy | final train loss |")
    print("|---|---|---|---|---|---|---|")
    cases = [("cnn", 64), ("cnn", 128), ("resnet18", 128)] if not args.smoke else [("cnn", 16)]
    base = Runtime(static_step=True) if device.type != "cuda" else None  # the CPU runs the uncaptured static step
    for family, px in cases:
        cfg = trial_config(family, px, sizes.epochs, args.smoke)
        data = synthetic(sizes.n_train, sizes.n_val, px, device)
        default = base or for_device(device, cfg.train)
        variants = {"engine": default,
                    "engine eager": dataclasses.replace(default, static_step=False, cuda_graph=False),
                    "engine + cudnn.benchmark": dataclasses.replace(default, cudnn_benchmark=True)}
        label = "seed-000 CNN" if family == "cnn" else "ResNet-18"
        for variant, rt in variants.items():
            r = engine_run(cfg, data, device, rt)
            busy = "n/a" if math.isnan(r["busy"]) else f"{r['busy']:.0%}"
            print(f"| {label} | {px} | {variant} | {r['img_s']:,.0f} | {r['first_s']:.2f} | {busy} | {r['loss']:.4f} |",
                  flush=True)
        plain = plain_loop(cfg, data, device, sizes.plain_images, 0 if args.smoke else min(4, os.cpu_count() or 1))
        print(f"| {label} | {px} | plain loop (DataLoader, fp32, .item()) | {plain:,.0f} | | | |", flush=True)
        del data
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n| workers K on one {'GPU' if device.type == 'cuda' else 'CPU'} | trials/hour | vs K=1 |")
    print("|---|---|---|")
    first = None
    for k in args.k or sizes.k_values:
        tph = trials_per_hour(k, device, sizes, args.smoke)
        first = first or tph
        print(f"| {k} | {tph:,.0f} | {tph / first:.2f}x |", flush=True)
    print(f"\n(K-run trial: seed-000 CNN, {sizes.k_size} px, {sizes.k_train} train images, {sizes.k_epochs} epochs; "
          f"{sizes.k_trials} trials per worker. Total bench time {time.perf_counter() - started:.0f} s.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
