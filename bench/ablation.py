"""Ablation: what each trick adds to the tutorial CNN trained alone (issue 23).

The tutorial CNN is the seed-cnn space's baseline trial (three 3x3 blocks of 32/64/128 channels,
batch norm, max-pool, FC 512, dropout 0.5, Adam 1e-3, weight decay 1e-4, StepLR every 7 epochs,
batch 64, 64 px), resolved through the space as a study's trial 0 is. Each row turns one trick
on by itself and trains the config with ``catdog-hpo train`` (a process of its own) for
``--epochs`` epochs on the same data and seed:

  baseline | + L1 1e-5 | + EMA 0.99 | + TTA flip | + mixup (alpha 0.2) | + cutmix (alpha 1)
  | + label smoothing 0.1 | + cosine schedule | + image size 96

A row whose config key does not exist in this checkout is skipped with a note. Per row: the best
and the final epoch's val accuracy, the training seconds (the epochs' own, from history.json:
data decoding and process start excluded) and the command's wall seconds. With ``--out`` a row
already run there with the same config is read back, not rerun (an interrupted run goes on).

Run:   .venv/bin/python bench/ablation.py [--data DIR] [--epochs 20] [--only baseline,mixup] [--out DIR]
Quick: .venv/bin/python bench/ablation.py --quick   (the synthetic set, 2 epochs: a smoke run)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXE = str(Path(sys.executable).with_name("catdog-hpo"))

# (name, what it changes, dotted config key -> value); the baseline first.
ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("baseline", "the tutorial CNN (seed-cnn baseline)", {}),
    ("l1", "+ L1 1e-5", {"optim.l1": 1e-5}),
    ("ema", "+ EMA of the weights, 0.99", {"train.ema": 0.99}),
    ("tta", "+ TTA: flip averaging", {"augment.tta": True}),
    ("mixup", "+ mixup, alpha 0.2", {"augment.mix": "mixup", "augment.mix_alpha": 0.2}),
    ("cutmix", "+ cutmix, alpha 1.0", {"augment.mix": "cutmix", "augment.mix_alpha": 1.0}),
    ("smoothing", "+ label smoothing 0.1", {"optim.label_smoothing": 0.1}),
    ("cosine", "+ cosine schedule (per step)", {"optim.scheduler": "cosine"}),
    ("size96", "+ image size 96 px", {"image_size": 96}),
)


def baseline_config() -> dict[str, Any]:
    """The seed-cnn space's baseline trial as a config dict (what a study runs as trial 0)."""
    import optuna

    from catdog_hpo.config import to_dict
    from catdog_hpo.search.space_files import load_space
    from catdog_hpo.search.spaces import resolve

    space = load_space("seed-cnn")
    return to_dict(resolve(space, optuna.trial.FixedTrial(space.baseline)))


def missing_key(cfg: dict[str, Any], change: dict[str, Any]) -> str | None:
    """The first dotted key of ``change`` that this checkout's config does not have, else None."""
    for dotted in change:
        node: Any = cfg
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return dotted
            node = node[key]
    return None


def row_config(base: dict[str, Any], change: dict[str, Any], epochs: int) -> dict[str, Any]:
    from catdog_hpo.config import TrialConfig, from_dict, replace_path, to_dict

    cfg = json.loads(json.dumps(base))
    for dotted, value in {**change, "train.epochs": epochs}.items():
        replace_path(cfg, dotted, value)
    return to_dict(from_dict(TrialConfig, cfg, where="ablation"))  # checked, as train reads it


def train_row(name: str, cfg: dict[str, Any], data: list[str], device: str, out: Path) -> dict[str, Any]:
    """Train one row's config with ``catdog-hpo train``; its result (read back if already run)."""
    folder = out / name
    done = folder / "ablation-row.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("config") == cfg:
            print(f"{name}: read back from {done}", flush=True)
            return saved
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    cmd = [EXE, "train", "--config", str(folder / "config.json"), *data, "--device", device,
           "--out", str(folder), "--no-progress"]
    print(f"{name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    # the repo as cwd: decoded images are cached once in studies/cache for every row and rerun
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (folder / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        print(f"note: row {name} failed (exit {proc.returncode}): {last}", flush=True)
        return {"config": cfg, "status": f"failed: {last}"}
    hist = json.loads((folder / "history.json").read_text())
    epochs = hist["history"]
    result = {
        "config": cfg, "status": hist["status"], "best_val_acc": hist["best_val_acc"],
        "best_epoch": hist["best_epoch"], "final_val_acc": epochs[-1]["val_acc"] if epochs else float("nan"),
        "train_s": sum(e["seconds"] for e in epochs), "wall_s": wall, "epochs_run": len(epochs),
    }
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(results: list[tuple[str, str, dict[str, Any]]], base_acc: float | None) -> str:
    lines = ["| row | change | best val acc | vs baseline | final val acc | train s | wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, label, r in results:
        if "best_val_acc" not in r:
            lines.append(f"| {name} | {label} | {r['status']} | | | | |")
            continue
        delta = f"{r['best_val_acc'] - base_acc:+.4f}" if base_acc is not None and name != "baseline" else ""
        lines.append(f"| {name} | {label} | {r['best_val_acc']:.4f} (epoch {r['best_epoch']}) | {delta} | "
                     f"{r['final_val_acc']:.4f} | {r['train_s']:.1f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared/data/catdog-kaggle-3k"),
                   help="image folder (default: ../shared/data/catdog-kaggle-3k)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per row (default 20; --quick: 2)")
    p.add_argument("--only", default=None, help=f"rows to run, comma-separated ({', '.join(r[0] for r in ROWS)})")
    p.add_argument("--quick", action="store_true", help="the synthetic set and 2 epochs: a quick smoke run")
    p.add_argument("--device", default="auto", help="catdog-hpo train --device (default: auto)")
    p.add_argument("--out", default=None, help="keep the rows' runs here; a row already run there is read back")
    args = p.parse_args(argv)
    names = [r[0] for r in ROWS]
    args.rows = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.rows if n not in names]
    if unknown:
        p.error(f"--only: unknown row {unknown[0]!r} (rows: {', '.join(names)})")
    if args.epochs is None:
        args.epochs = 2 if args.quick else 20
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        data = ["--dataset", "synthetic"]
    else:
        if not (Path(args.data) / "train").is_dir():
            print(f"skipped: no image folder at {args.data} (--data DIR)")
            return 0
        data = ["--data", str(Path(args.data).resolve())]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ablation-"))
    out.mkdir(parents=True, exist_ok=True)
    base = baseline_config()
    results: list[tuple[str, str, dict[str, Any]]] = []
    for name, label, change in ROWS:
        if name not in args.rows:
            continue
        missing = missing_key(base, change)
        if missing is not None:
            print(f"note: row {name} skipped: config key {missing} does not exist in this checkout", flush=True)
            continue
        results.append((name, label, train_row(name, row_config(base, change, args.epochs), data, args.device, out)))
    base_acc = next((r.get("best_val_acc") for n, _, r in results if n == "baseline"), None)
    what = "synthetic set (--quick)" if args.quick else args.data
    text = (f"Ablation on {what}: {args.epochs} epochs per row, seed 0, device {args.device}; runs in {out}\n\n"
            + table(results, base_acc))
    (out / "ablation.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
