"""Warm start (run --warm-start): does a study that starts from another one's results get there sooner?

Three real `catdog-hpo run` subprocesses on one wall-clock budget each, one at a time, each in its
own SQLite store under --out, with the same data, space and flags but for these:

    source   --seed 1                                       a cold study: what the warm one starts from
    cold     --seed 0                                       a cold study of another seed
    warm     --seed 0 --warm-start source@<its store>      the same, warm-started from the source

The source searched the same space on the same data, so the warm study both runs the source's
best --warm-start-top configs first (after the baseline) and gives TPE the source's trials as
history. Compared: the best val accuracy of each, and when the warm and the cold study first
reached the cold study's best (seconds from their first trial's start, and as a fraction of the
budget; "never" when it did not). History trials are not the warm study's own: every number here
is read from its own trials only (bench/budget.py's read_study).

    # full: ../shared/data/catdog-kaggle-3k, the run command's default space, 20m per study: about 1 hour
    .venv/bin/python bench/warm_start.py --out runs/warm20
    # quick: 150/75 photos per class (train/val; links, no copies), 2 epochs, 2m per study: about 7 minutes
    .venv/bin/python bench/warm_start.py --quick
    # smoke (about 4 minutes; on a loaded machine a 30s budget can leave a study no trial at all)
    .venv/bin/python bench/warm_start.py --dataset synthetic --space quick --epochs 1 --budget 60s

Prints one markdown table (a row per study) and the comparison line. A study already finished in
--out is read, not rerun (bench/budget.py's run_study), so an interrupted run goes on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import budget  # noqa: E402  (bench/budget.py: one study subprocess, its numbers, the formatting)

QUICK_PHOTOS = {"train": 150, "val": 75}  # photos per class and split in the --quick subset
SOURCE_SEED, SEED = 1, 0


def data_flags(args: argparse.Namespace, out: Path) -> tuple[list[str], str] | None:
    """The run command's data flags and a label; None when the photos are absent (full run)."""
    if args.dataset:
        return ["--dataset", args.dataset], args.dataset
    from helpers import kaggle_path  # tests/helpers.py (bench/budget.py puts tests/ on the path)

    photos = Path(args.data) if args.data else kaggle_path()
    if photos is None or not (photos / "train").is_dir():
        return (["--dataset", "synthetic"], "synthetic (no photos)") if args.quick else None
    if not args.quick:
        return ["--data", str(photos.resolve())], photos.name
    subset = out / "data" / "catdog-kaggle-quick"
    for split, per_class in QUICK_PHOTOS.items():  # the photo folder's train/val layout, linked
        budget.link_first(photos / split, subset / split, per_class)
    return ["--data", str(subset)], f"photos subset {2 * QUICK_PHOTOS['train']}/{2 * QUICK_PHOTOS['val']}"


def studies(common: list[str], out: Path, top: int) -> list[tuple[str, list[str]]]:
    """(name, flags) of the three studies, in the order they run."""
    source = f"source-seed{SOURCE_SEED}"
    return [
        (source, [*common, "--seed", str(SOURCE_SEED)]),
        (f"cold-seed{SEED}", [*common, "--seed", str(SEED)]),
        (f"warm-seed{SEED}", [*common, "--seed", str(SEED), "--warm-start", f"{source}@sqlite:///{out}/{source}.db",
                              "--warm-start-top", str(top)]),
    ]


def warm_numbers(name: str, storage: str) -> dict[str, Any]:
    """What the warm start gave a study: history trials, the replayed configs and their best."""
    import optuna

    from catdog_hpo.search.record import TrialKey, finished_complete, from_history

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    replayed = [t for t in trials if TrialKey.WARM_START_FROM in t.user_attrs]
    values = [t.value for t in replayed if finished_complete(t)]
    return {"history": sum(from_history(t) for t in trials), "replayed": len(replayed),
            "replayed_best": max(values, default=None)}


def table(rows: list[dict[str, Any]], cold_best: float | None) -> None:
    print("| study | seed | history trials | replayed configs (best) | finished | best val acc "
          "| reached cold's best at (s) | of the budget | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        at = budget.reached(r["curve"], cold_best)
        frac = budget._fraction(at, r["budget_s"])  # noqa: SLF001 (bench/budget.py's own helper)
        print(f"| {r['name']} | {r['seed']} | {r['history']} | {r['replayed']} ({budget.fmt(r['replayed_best'], '.4f')}) "
              f"| {r['finished']} | {budget.fmt(r['best'], '.4f')} | {budget.fmt(at, '.0f') if at is not None else 'never'} "
              f"| {budget.fmt(frac, '.2f')} | {r['wall']:.0f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a 150/75-per-class photo subset, --epochs 2, 2m per study (about 7 minutes)")
    p.add_argument("--out", default=None, help="keep stores and logs here; a study finished there is read, not rerun")
    p.add_argument("--budget", default=None, help="per study (default 20m; --quick: 2m)")
    p.add_argument("--top", type=int, default=3, help="--warm-start-top for the warm study (default: 3)")
    p.add_argument("--epochs", type=int, default=None, help="--epochs for every study (default: the space's; --quick: 2)")
    p.add_argument("--data", default=None, help="the photo folder, train/ and val/ (default: ../shared/data/catdog-kaggle-3k)")
    p.add_argument("--dataset", default=None, help="a built-in dataset instead (synthetic for a smoke run)")
    p.add_argument("--space", default=None, help="search space (default: the run command's)")
    args = p.parse_args(argv)
    args.budget = args.budget or ("2m" if args.quick else "20m")
    args.epochs = args.epochs or (2 if args.quick else None)
    if args.top < 1:
        p.error(f"--top {args.top}: must be 1 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="catdog-bench-warm-") as tmp:
        out = Path(args.out).resolve() if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = data_flags(args, out)
        if data is None:
            print("skipped: no photos (../shared/data/catdog-kaggle-3k absent; pass --data DIR, --dataset NAME or --quick)")
            return 0
        space = str(Path(args.space).resolve()) if args.space and Path(args.space).is_file() else args.space
        common = ([*data[0], "--budget", args.budget] + (["--space", space] if space else [])
                  + (["--epochs", str(args.epochs)] if args.epochs else []))
        plan = studies(common, out, args.top)
        if any(not budget.done_file(out, name).exists() for name, _ in plan):
            budget.warm_cache(out, common)  # decoded once, before the first study: no study's wall time has it
        rows = []
        for name, flags in plan:  # one at a time: no two share the cores
            row = budget.run_study(out, name, flags)
            rows.append({**row, **warm_numbers(name, f"sqlite:///{out}/{name}.db")})
    cold, warm = rows[1], rows[2]
    print(f"\nwarm start: {data[1]}, --budget {args.budget} per study"
          + (f", --epochs {args.epochs}" if args.epochs else "") + f"; flags: {' '.join(common)}\n")
    table(rows, cold["best"])
    if cold["best"] is not None and warm["best"] is not None:
        at_warm, at_cold = budget.reached(warm["curve"], cold["best"]), budget.reached(cold["curve"], cold["best"])
        print(f"\n- warm - cold: {100 * (warm['best'] - cold['best']):+.1f} points of best val acc "
              f"({warm['best']:.4f} vs {cold['best']:.4f}); the warm study reached the cold study's best at "
              f"{'never' if at_warm is None else f'{at_warm:.0f} s'}, the cold study at {budget.fmt(at_cold, '.0f')} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
