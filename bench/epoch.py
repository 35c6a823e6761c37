"""Seconds per training epoch and val accuracy: our engine vs the seed's tutorial-style loop.

Both train the seed-000 CNN (ModelConfig() defaults: 3 blocks 32/64/128, 3x3, max-pool, BN,
FC 512, dropout 0.5) with Adam(lr 1e-3, weight decay 1e-4), StepLR(5, 0.1), batch 64, the same
initial weights (seed 0), on /work/shared/data/catdog-kaggle-3k (2,000 train / 1,000 val).

- engine: ``catdog_hpo.engine.train.fit`` on the decoded uint8 set (decoded once by ``load_images``:
  centre square scaled to PX; the one-time decode, or the cache read, is the "load s" column),
  random resized crop at strength 1 (torchvision's default scale 0.08-1 and ratio 3/4-4/3) +
  flip on the device. It drops the last partial batch (31 x 64 of the 2,000 images per epoch).
  Two engine rows on the CPU: its default runtime (``for_device``: channels_last, bf16 autocast
  where the CPU has bf16 in hardware) and plain fp32 NCHW (the engine's CPU path before it).
- seed loop: torchvision ImageFolder + RandomResizedCrop(PX) + RandomHorizontalFlip + ToTensor
  + Normalize, DataLoader(batch 64, shuffle, num_workers=2), per-step ``loss.item()``; val:
  Resize(PX) + CenterCrop(PX). Every epoch decodes every JPEG again.

s/epoch is the wall time of an epoch including its validation pass (mean and fastest: on a
shared machine the fastest is the steadier number); val acc is after the last epoch. Run:
.venv/bin/python bench/epoch.py [--sizes 64 128] [--epochs 3] [--device auto]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from catdog_hpo.config import AugmentConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig  # noqa: E402
from catdog_hpo.data import DataSource, load_images  # noqa: E402
from catdog_hpo.engine.augment import MEAN, STD  # noqa: E402
from catdog_hpo.engine.device import resolve_device  # noqa: E402
from catdog_hpo.engine.models import build_model  # noqa: E402
from catdog_hpo.engine.runtime import Runtime, for_device  # noqa: E402
from catdog_hpo.engine.train import fit  # noqa: E402

BATCH = 64
SEED = 0


def data_root() -> Path:
    env = os.environ.get("CATDOG_KAGGLE")
    return Path(env) if env else REPO.parent / "shared/data/catdog-kaggle-3k"


def trial_config(px: int, epochs: int) -> TrialConfig:
    return TrialConfig(
        image_size=px,
        model=ModelConfig(),
        augment=AugmentConfig(crop="resized", flip=True, color_jitter=False, strength=1.0),
        optim=OptimConfig(name="adam", lr=1e-3, weight_decay=1e-4, scheduler="step", step_size=5, gamma=0.1),
        train=TrainConfig(epochs=epochs, batch_size=BATCH, seed=SEED),
    )


def run_engine(root: Path, px: int, epochs: int, device: torch.device,
               runtime: Runtime | None = None) -> tuple[float, list[float], float]:
    """(load seconds, seconds of each epoch, final val accuracy). ``runtime``: None is the
    device's default (for_device)."""
    start = time.perf_counter()
    data = load_images(DataSource(path=str(root)), px, REPO / "studies/cache")
    load_s = time.perf_counter() - start
    result = fit(trial_config(px, epochs), data, device, runtime=runtime, on_epoch_end=lambda s: print(
        f"  engine {px} px epoch {s.epoch}: train loss {s.train_loss:.4f}, val acc {s.val_acc:.4f}, "
        f"{s.seconds:.1f} s", file=sys.stderr))
    assert result.status == "completed", result.reason
    return load_s, [s.seconds for s in result.history], result.history[-1].val_acc


def run_seed_loop(root: Path, px: int, epochs: int, device: torch.device) -> tuple[float, list[float], float]:
    """The tutorial loop the project started from, written out faithfully."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    start = time.perf_counter()
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(px), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    val_tf = transforms.Compose([
        transforms.Resize(px), transforms.CenterCrop(px), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    train_ds = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val_ds = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    train_dl = DataLoader(train_ds, batch_size=BATCH, shuffle=True, num_workers=2)
    val_dl = DataLoader(val_ds, batch_size=BATCH, shuffle=False, num_workers=2)
    load_s = time.perf_counter() - start

    torch.manual_seed(SEED)  # the same initial weights as the engine's run
    cfg = trial_config(px, epochs)
    model = build_model(cfg.model, len(train_ds.classes), px).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.optim.step_size, gamma=cfg.optim.gamma)
    criterion = nn.CrossEntropyLoss()
    seconds: list[float] = []
    acc = 0.0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        running_loss = 0.0
        for images, labels in train_dl:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * images.size(0)  # a host sync every step, as tutorials do
        scheduler.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val_dl:
                images, labels = images.to(device), labels.to(device)
                correct += (model(images).argmax(1) == labels).sum().item()
                total += labels.size(0)
        acc = correct / total
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        print(f"  seed loop {px} px epoch {epoch}: train loss {running_loss / len(train_ds):.4f}, "
              f"val acc {acc:.4f}, {seconds[-1]:.1f} s", file=sys.stderr)
    return load_s, seconds, acc


def describe(rt: Runtime) -> str:
    parts = [f"{rt.autocast}".replace("torch.", "") + " autocast" if rt.autocast else "fp32",
             "channels_last" if rt.channels_last else "NCHW"]
    return ", ".join(parts + (["CUDA graph"] if rt.cuda_graph else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes, px")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args()
    root = data_root()
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        print(f"skipped: {root} (train/ and val/) is not here; set CATDOG_KAGGLE to its folder")
        return 0
    device = resolve_device(args.device)
    print(f"data {root}, device {device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, {args.epochs} epochs, batch {BATCH}\n")
    rows = []
    for px in args.sizes:
        default = for_device(device, trial_config(px, args.epochs).train)
        runners = [(f"engine (fit, uint8 on device), default: {describe(default)}", run_engine)]
        if device.type == "cpu":  # the CPU default against plain fp32 NCHW, the engine's old CPU path
            runners.append(("engine, fp32 NCHW", functools.partial(run_engine, runtime=Runtime())))
        runners.append(("seed loop (ImageFolder + DataLoader)", run_seed_loop))
        for name, runner in runners:
            load_s, seconds, acc = runner(root, px, args.epochs, device)
            rows.append((px, name, load_s, sum(seconds) / len(seconds), min(seconds), acc))
    print("| px | pipeline | load s (once) | s/epoch (mean) | s/epoch (min) | val acc |")
    print("|---:|---|---:|---:|---:|---:|")
    for px, name, load_s, mean_s, min_s, acc in rows:
        print(f"| {px} | {name} | {load_s:.1f} | {mean_s:.2f} | {min_s:.2f} | {acc:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
