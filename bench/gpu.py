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
   includes its validation pass); 1st epoch s (graph capture, autotuning); busy: the time in
   which a kernel or copy ran during the last epoch (torch.profiler, CUDA activity) over the wall
   time of an unprofiled steady epoch (the profiler's own host overhead would weigh on the eager
   rows more than on the graph rows); n/a without CUDA activity recorded. Every row sets the
   backend flags itself: TF32 and cuDNN autotuning as its label says (the plain loop: neither).
   The graph and eager rows train the same seed: their final train losses are printed side by
   side (bf16 rounding aside they must agree: the check that the captured step is the eager one).
2. trials/hour: K = 1, 2, 4, 8 worker processes on GPU 0, each pinned as a run's workers are
   (CUDA_VISIBLE_DEVICES, expandable segments, 2 CPU threads), each running M trials of the
   seed-000 CNN at 64 px after one warm-up trial, with a run's memory share (1/K of the GPU);
   wall time from a shared start barrier (a worker that dies first ends the row, no hang).

Run: .venv/bin/python bench/gpu.py [--device cuda] [--smoke]   (--device cpu --smoke: seconds)
Targets: >= 50% busy for the seed CNN at 64 px; >= 3x the plain loop's img/s; K=4 >= 2x K=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import os
import queue
import sys
import threading
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
START_TIMEOUT_S = 300.0  # seconds for the K workers to load and run their warm-up trial
RUN_TIMEOUT_S = 600.0  # seconds for the K workers' timed trials


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


def set_backends(cudnn_benchmark: bool, tf32: bool) -> None:
    """The process-wide backend flags a row runs with, set per row: a row must not inherit them
    from the row before (fit's apply_backends sets cudnn.benchmark and never resets it)."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def busy_fraction(kernel_s: float, steady_epoch_s: list[float]) -> float:
    """Kernel time of the profiled epoch over the mean wall time of the unprofiled steady epochs;
    NaN (printed n/a) without CUDA activity or without an unprofiled steady epoch."""
    if kernel_s <= 0 or not steady_epoch_s:
        return math.nan
    return kernel_s / (sum(steady_epoch_s) / len(steady_epoch_s))


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
            prof["p"] = p
        elif stats.epoch == cfg.train.epochs and "p" in prof:
            torch.cuda.synchronize()
            prof["p"].__exit__(None, None, None)
            prof["kernel_s"] = _kernel_busy(prof["p"]) / 1e6  # us -> s

    set_backends(rt.cudnn_benchmark, tf32=True)  # configure_process's TF32, the row's autotuning
    result = fit(cfg, data, device, on_epoch_end=on_epoch_end, runtime=rt)
    h = result.history
    images = (data.train_x.shape[0] // cfg.train.batch_size) * cfg.train.batch_size
    steady = h[1:-1] if cuda else h[1:]  # not the first, not the profiled (profiler overhead)
    timed = steady or h[-1:]
    busy = busy_fraction(prof.get("kernel_s", 0.0), [s.seconds for s in steady])
    return {"img_s": images * len(timed) / sum(s.seconds for s in timed), "first_s": h[0].seconds,
            "busy": busy, "loss": h[-1].train_loss}


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

    set_backends(cudnn_benchmark=False, tf32=False)  # PyTorch's defaults, but true fp32 convolutions too
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


def _k_worker(device: str, k: int, sizes: Sizes, smoke: bool, barrier: Any, out: Any) -> None:
    from catdog_hpo.engine.device import free_device_memory, pin_worker_device
    from catdog_hpo.engine.train import fit

    device = pin_worker_device(device, k > 1)  # before any CUDA call, as a run's worker does
    configure_process(device, workers_on_gpu=k if device != "cpu" else 1)  # a run's memory share
    dev = torch.device(device)
    data = synthetic(sizes.k_train, sizes.k_train // 4, sizes.k_size, dev)
    cfg = trial_config("cnn", sizes.k_size, sizes.k_epochs, smoke)
    fit(cfg, data, dev)  # warm-up trial: CUDA context, cuDNN/cuBLAS handles
    barrier.wait(timeout=START_TIMEOUT_S)  # the parent gone or aborted: BrokenBarrierError, exit
    for seed in range(sizes.k_trials):
        fit(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed + 1)), data, dev)
        free_device_memory()  # as a run's worker does after every trial
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out.put(time.time())


def wait_barrier(barrier: Any, procs: list[Any], timeout_s: float, poll_s: float = 0.2) -> None:
    """The parent's wait at the workers' start barrier. A worker that exits first (it died: a
    live one waits at the barrier) or ``timeout_s`` passing aborts the barrier, so the workers
    still waiting stop too, and raises RuntimeError; a plain barrier.wait() would hang for good.
    ``procs``: anything with ``exitcode`` (None while running)."""
    broken: list[BaseException] = []

    def wait() -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError as exc:
            broken.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    deadline = time.monotonic() + timeout_s
    while waiter.is_alive():
        codes = [p.exitcode for p in procs if p.exitcode is not None]
        if codes or time.monotonic() > deadline:
            barrier.abort()
            waiter.join(timeout=5.0)
            why = f"a worker exited (code {codes[0]})" if codes else f"not all ready after {timeout_s:.0f} s"
            raise RuntimeError(f"K-run start barrier: {why}")
        waiter.join(timeout=poll_s)
    if broken:
        raise RuntimeError("K-run start barrier: broken") from broken[0]


def _collect(out: Any, procs: list[Any], timeout_s: float) -> list[float]:
    """One end time per worker; RuntimeError when one exits without it or time runs out."""
    ends: list[float] = []
    deadline = time.monotonic() + timeout_s
    while len(ends) < len(procs):
        try:
            ends.append(out.get(timeout=1.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"K run: a worker failed (exit codes {[p.exitcode for p in procs]})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"K run: not done after {timeout_s:.0f} s") from None
    return ends


def trials_per_hour(k: int, device: torch.device, sizes: Sizes, smoke: bool) -> float:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(k + 1), ctx.Queue()
    name = "cuda:0" if device.type == "cuda" else "cpu"
    procs = [ctx.Process(target=_k_worker, args=(name, k, sizes, smoke, barrier, out)) for _ in range(k)]
    for p in procs:
        p.start()
    try:
        wait_barrier(barrier, procs, START_TIMEOUT_S)
        start = time.time()
        ends = _collect(out, procs, RUN_TIMEOUT_S)
    except BaseException:
        for p in procs:  # a failed row must not leave workers holding the GPU
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():  # done but stuck in its exit: its result is in
                p.kill()
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
        try:
            tph = trials_per_hour(k, device, sizes, args.smoke)
        except RuntimeError as exc:  # one K failed (a worker died, timed out): the other rows still run
            print(f"| {k} | failed: {exc} | |", flush=True)
            continue
        first = first or tph
        print(f"| {k} | {tph:,.0f} | {tph / first:.2f}x |", flush=True)
    print(f"\n(K-run trial: seed-000 CNN, {sizes.k_size} px, {sizes.k_train} train images, {sizes.k_epochs} epochs; "
          f"{sizes.k_trials} trials per worker. Total bench time {time.perf_counter() - started:.0f} s.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
