"""A study that fits the user's time: TPE + the default pruner (`run --sampler tpe --trials 100
--budget 60m`) vs random search without pruning and without --trials (as many as fit), the same
wall-clock budget, side by side (one after the other, so they never share the cores).

    .venv/bin/python bench/budget.py                 # 60m each on ../shared/data/catdog-kaggle-3k
    .venv/bin/python bench/budget.py --quick         # 10m each
    .venv/bin/python bench/budget.py --dataset synthetic --space quick --budget 30s   # smoke
    .venv/bin/python bench/budget.py --out runs/b60 --only tpe    # one study now, kept in runs/b60;
    .venv/bin/python bench/budget.py --out runs/b60               # the other later, then the table

Prints a markdown table: wall time, finished trials, configs turned away by the guard, best val
accuracy, points over the baseline, and when TPE first reached random's final best (fraction of
the budget). Each run goes to its own fresh store under a temporary folder, or under --out, where
a study whose store is already there is read, not run again.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLI = [sys.executable, "-m", "catdog_hpo"]


def data_flags(args: argparse.Namespace) -> list[str] | None:
    if args.dataset:
        return ["--dataset", args.dataset]
    from helpers import kaggle_path

    path = Path(args.data) if args.data else kaggle_path()
    return ["--data", str(path)] if path is not None and path.is_dir() else None


def run_study(workdir: Path, name: str, flags: list[str]) -> dict[str, Any]:
    """Run one study to the end in ``workdir``; its numbers (see the module docstring)."""
    import optuna
    from optuna.trial import TrialState

    from catdog_hpo.search.budget import spent_seconds
    from catdog_hpo.search.record import TrialKey
    from catdog_hpo.search.study import baseline_trial, counts_toward_n

    storage = f"sqlite:///{workdir}/{name}.db"
    wall_file = workdir / f"{name}.wall_s"
    if not wall_file.exists():
        (workdir / f"{name}.db").unlink(missing_ok=True)  # an unfinished earlier run: start afresh
        start = time.time()
        proc = subprocess.run([*CLI, "run", "--study", name, "--storage", storage, "--no-progress", *flags],
                              cwd=workdir, capture_output=True, text=True)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        wall_file.write_text(f"{time.time() - start:.1f}\n")
        (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    wall = float(wall_file.read_text())
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    t0 = min((t.datetime_start for t in trials if t.datetime_start), default=None)
    curve = sorted(((t.datetime_complete - t0).total_seconds(), t.value) for t in done) if t0 else []
    base = baseline_trial(study)
    best = max((v for _, v in curve), default=None)
    return {"name": name, "wall": wall, "spent": spent_seconds(study),
            "finished": sum(counts_toward_n(t) for t in trials),
            "rejected": sum(TrialKey.REJECTED in t.user_attrs for t in trials),
            "best": best, "curve": curve,
            "over_baseline": None if best is None or base is None or base.value is None else 100 * (best - base.value)}


def reached(curve: list[tuple[float, float]], target: float | None) -> float | None:
    """Seconds until the curve first reached ``target``."""
    if target is None:
        return None
    return next((s for s, v in curve if v >= target - 1e-12), None)


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default=None, help="per study (default 60m; --quick: 10m)")
    p.add_argument("--quick", action="store_true", help="10 minutes per study")
    p.add_argument("--trials", type=int, default=100, help="the TPE study's --trials (random runs as many as fit)")
    p.add_argument("--data", default=None, help="image folder (default: ../shared/data/catdog-kaggle-3k)")
    p.add_argument("--dataset", default=None, help="a built-in dataset instead (synthetic for a smoke run)")
    p.add_argument("--space", default=None, help="search space (default: the run command's)")
    p.add_argument("--out", default=None, help="keep the stores and logs here; a study already there is read, not rerun")
    p.add_argument("--only", choices=["tpe", "random"], default=None, help="run just this study (with --out)")
    args = p.parse_args(argv)
    budget = args.budget or ("10m" if args.quick else "60m")
    data = data_flags(args)
    if data is None:
        print("skipped: no data (../shared/data/catdog-kaggle-3k absent; pass --data DIR or --dataset NAME)")
        return 0
    from catdog_hpo.search.budget import format_duration, parse_duration

    budget_s = parse_duration(budget)
    common = [*data, "--budget", budget] + (["--space", args.space] if args.space else [])
    if args.only and not args.out:
        p.error("--only needs --out (the other study runs later into the same folder)")
    # Random search runs without --trials: as many trials as the budget fits, so the guard turns
    # away only what cannot finish. With --trials 100 its fair share (72 s at the start) refused
    # every full unpruned 20-epoch trial but the smallest, and 25 refusals in a row ended it at
    # 7 minutes (measured): no baseline to compare with.
    studies = {"tpe": ("tpe-default", [*common, "--trials", str(args.trials), "--sampler", "tpe"]),
               "random": ("random-nopruning", [*common, "--sampler", "random", "--pruner", "none"])}
    with tempfile.TemporaryDirectory(prefix="catdog-bench-budget-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.only:
            r = run_study(out, *studies[args.only])
            print(f"{r['name']}: {r['finished']} finished, {r['rejected']} turned away, best {fmt(r['best'], '.4f')}, "
                  f"{fmt(r['over_baseline'], '+.1f')} over the baseline, {r['wall']:.0f} s")
            return 0
        tpe = run_study(out, *studies["tpe"])
        rnd = run_study(out, *studies["random"])
    when = reached(tpe["curve"], rnd["best"])
    print(f"\nbudget {format_duration(budget_s)} per study; TPE --trials {args.trials}, random as many as fit; "
          f"data {' '.join(data)}\n")
    print("| study | wall (s) | budget spent (s) | finished trials | turned away | best val acc | points over baseline | reached random's best at |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in (tpe, rnd):
        at = (fmt(when / budget_s, ".2f") + " of the budget") if r is tpe and when is not None else \
            ("never" if r is tpe else "-")
        print(f"| {r['name']} | {r['wall']:.0f} | {r['spent']:.0f} | {r['finished']} | {r['rejected']} | "
              f"{fmt(r['best'], '.4f')} | {fmt(r['over_baseline'], '+.1f')} | {at} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
