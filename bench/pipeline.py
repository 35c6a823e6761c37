"""Input-pipeline speed: decode-once + batched tensor augmentation vs the tutorial DataLoader.

On /work/shared/data/catdog-kaggle-3k (2,000 train / 1,000 val JPEGs; $CATDOG_KAGGLE overrides):

(a) decode: seconds to decode all 3,000 images into a fresh cache folder (``load_images``:
    Pillow with JPEG draft mode, one thread per core, then the atomic cache write), and seconds
    to load that cache again (a fresh call that finds the file).
(b) throughput, images/s, over whole epochs of the 2,000 training images, on the CPU:
    - ours: the real training input path with the cache present: ``load_images`` (cache hit),
      then per epoch ``randperm`` + ``augment_batch`` (random resized crop at strength 1 =
      torchvision's default scale 0.08-1 and ratio 3/4-4/3, + flip, + normalise) in batches
      of 64. The cache read is counted once, in the first epoch.
    - seed: torchvision ImageFolder + RandomResizedCrop(px) + RandomHorizontalFlip + ToTensor +
      Normalize through DataLoader(batch 64, shuffle, num_workers=2), as tutorials do; every
      epoch decodes every JPEG again and starts its workers again (the default).
    No model runs: this is the cost of producing the batches alone.

Run: .venv/bin/python bench/pipeline.py [--sizes 64 128] [--epochs 3] [--seed-epochs 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from catdog_hpo.config import AugmentConfig  # noqa: E402
from catdog_hpo.data import DataSource, load_images  # noqa: E402
from catdog_hpo.engine.augment import MEAN, STD, augment_batch  # noqa: E402

BATCH = 64
GATHER_LABEL = {"index_select": "x.index_select(0, idx)", "index": "x[idx]"}
AUGMENT = AugmentConfig(crop="resized", flip=True, color_jitter=False, strength=1.0)


def data_root() -> Path:
    env = os.environ.get("CATDOG_KAGGLE")
    return Path(env) if env else REPO.parent / "shared/data/catdog-kaggle-3k"


def bench_decode(root: Path, px: int, cache: Path) -> tuple[float, float, float, int]:
    """(first decode + cache write s, cache load s, cache file MB, images) into ``cache``."""
    start = time.perf_counter()
    data = load_images(DataSource(path=str(root)), px, cache)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = load_images(DataSource(path=str(root)), px, cache)
    load_s = time.perf_counter() - start
    assert torch.equal(again.train_x, data.train_x)
    mb = sum(f.stat().st_size for f in cache.glob(f"*-{px}px-*.pt")) / 2**20
    return first, load_s, mb, len(data.train_y) + len(data.val_y)


def bench_ours(root: Path, px: int, cache: Path, epochs: int, gather: str, threads: int) -> tuple[int, float, float]:
    """(images, seconds, of which cache-load seconds) for ``epochs`` epochs: cache load once,
    then randperm + augment per epoch.

    gather "index_select": ``x.index_select(0, idx)`` (row copies); "index": ``x[idx]``
    (advanced indexing, element by element for uint8 on the CPU: much slower). ``threads``:
    torch's intra-op threads for the run (restored after)."""
    gen = torch.Generator().manual_seed(0)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    data = load_images(DataSource(path=str(root)), px, cache)  # cache hit (made by bench_decode)
    load_s = time.perf_counter() - start  # once per worker process, not per epoch
    x, y = data.train_x, data.train_y
    checksum = torch.zeros(())
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(perm), BATCH):
            idx = perm[i : i + BATCH]
            xb = x.index_select(0, idx) if gather == "index_select" else x[idx]
            batch = augment_batch(xb, AUGMENT, gen)
            labels = y.index_select(0, idx) if gather == "index_select" else y[idx]
            checksum += batch[0, 0, 0, 0] + labels[0]  # touch the outputs so nothing is skipped
    seconds = time.perf_counter() - start
    torch.set_num_threads(saved)
    assert torch.isfinite(checksum)
    return epochs * len(y), seconds, load_s


def bench_seed(root: Path, px: int, epochs: int) -> tuple[int, float]:
    """(images, seconds) for ``epochs`` epochs of the tutorial DataLoader pipeline."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(px), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    start = time.perf_counter()
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2)
    n = 0
    for _ in range(epochs):
        for batch, labels in loader:
            n += len(labels)
            assert batch.shape[-1] == px
    return n, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes, px")
    p.add_argument("--epochs", type=int, default=5, help="epochs of our pipeline per size")
    p.add_argument("--seed-epochs", type=int, default=2, help="epochs of the DataLoader pipeline per size")
    args = p.parse_args()
    root = data_root()
    if not (root / "train").is_dir():
        print(f"skipped: {root} is not here (set CATDOG_KAGGLE to the catdog-kaggle-3k folder)")
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"data: {root}; torch CPU threads: {torch.get_num_threads()}, cores: {os.cpu_count()}, "
          f"load average at start: {load:.1f}\n")
    default_threads = torch.get_num_threads()
    cache = Path(tempfile.mkdtemp(prefix="catdog-bench-cache-"))
    try:
        decode_rows, speed_rows = [], []
        for px in args.sizes:
            first, load_s, mb, n = bench_decode(root, px, cache)
            decode_rows.append(f"| {px} | {n} | {first:.2f} | {load_s:.3f} | {mb:.0f} |")
            n_seed, s_seed = bench_seed(root, px, args.seed_epochs)
            seed = n_seed / s_seed
            speed_rows.append(f"| {px} | seed: ImageFolder + DataLoader(workers=2) | {args.seed_epochs} | "
                              f"{s_seed / args.seed_epochs:.3f} | {seed:,.0f} | 1.0x | {seed:,.0f} | 1.0x |")
            for gather, threads in (("index_select", default_threads), ("index_select", 1), ("index", 1)):
                n_ours, s_ours, load_s = bench_ours(root, px, cache, args.epochs, gather, threads)
                ours, steady = n_ours / s_ours, n_ours / (s_ours - load_s)
                speed_rows.append(
                    f"| {px} | ours: cache + {GATHER_LABEL[gather]} + augment_batch, {threads} thread(s) | "
                    f"{args.epochs} | {(s_ours - load_s) / args.epochs:.3f} | {steady:,.0f} | {steady / seed:.1f}x | "
                    f"{ours:,.0f} | {ours / seed:.1f}x |")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print("Decode once (fresh cache folder), then load the cache:\n")
    print("| px | images | first decode + cache write (s) | cache load (s) | cache file (MB) |")
    print("|---:|---:|---:|---:|---:|")
    print("\n".join(decode_rows))
    print("\nTraining input pipeline, 2,000 train images per epoch, batch 64, CPU:\n")
    print("Per epoch: the epochs alone (our cache load happens once per worker, above); the last two")
    print("columns spread that one load over these few epochs too (the seed's DataLoader restarts")
    print("its workers and decodes every JPEG again each epoch, so its figure is per epoch either way).\n")
    print("| px | pipeline | epochs | s/epoch | images/s | speedup | images/s incl. load | speedup incl. load |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(speed_rows))


if __name__ == "__main__":
    main()
