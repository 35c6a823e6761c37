"""Samplers on the same wall-clock budget: TPE + median pruner vs random vs grid (no pruner).

Each study is a real `catdog-hpo run` (``catdog_hpo.search.run.run`` with ``RunSettings``, one worker)
on the 3,000 real photos (2,000 train / 1,000 val), searching ``bench/search_space.yaml`` (small
CNNs at 32 px, 36 grid points) with a fixed ``--epochs``, ``--timeout`` = the budget and no trial
limit (the grid stops at its end). Every (sampler, seed) pair is its own study in a fresh SQLite
store; the decoded images are cached once under ``--out``.

Per study: the best val accuracy of the trials that finished within the budget, and the time to
target: seconds from the first trial's start to the completion of the first trial whose val
accuracy reached ``--target`` (``-`` when none did within the budget). The image decode and
start-up come before the first trial and are not counted; a trial started before the deadline
may end after it and then does not count.

Summary per sampler: mean best accuracy, how many seeds reached the target, mean and median
time to target over the seeds that reached it, and the speedup vs random (random's median time
to target / this sampler's). One machine, one worker per study, studies run one after another.

Run: .venv/bin/python bench/search.py [--budget 240] [--seeds 2] [--target 0.645] [--epochs 4]
     [--samplers tpe random grid] [--out bench/out/search]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRUNER = {"tpe": "median", "random": "none", "grid": "none"}  # sampler -> its pruner here
SPACE = REPO / "bench" / "search_space.yaml"


def data_root() -> Path:
    env = os.environ.get("CATDOG_KAGGLE")
    return Path(env) if env else REPO.parent / "shared/data/catdog-kaggle-3k"


@dataclass(frozen=True)
class Outcome:
    sampler: str
    seed: int
    trials: int  # finished (complete + pruned) within the budget
    best: float  # best val accuracy within the budget (nan: none completed)
    to_target: float  # seconds to the first trial at or over the target (inf: not reached)
    first_trial_s: float  # seconds from the run's start to its first trial's start (decode, start-up)


def one_study(sampler: str, seed: int, args: argparse.Namespace, store: str, out: Path) -> Outcome:
    import optuna
    from optuna.trial import TrialState

    from catdog_hpo.data import DataSource
    from catdog_hpo.search.run import run
    from catdog_hpo.search.settings import RunSettings

    name = f"{sampler}-seed{seed}"
    settings = RunSettings(
        study=name, storage=store, space=str(args.space), sampler=sampler, pruner=PRUNER[sampler],
        trials=100_000, data=DataSource(path=str(args.data)), timeout=args.budget, epochs=args.epochs,
        seed=seed, studies_dir=out, progress=False,
    )
    started = time.time()
    with open(out / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run(settings)
    study = optuna.load_study(study_name=name, storage=store)
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start is not None]
    t0 = min(t.datetime_start for t in trials)

    def at(t: optuna.trial.FrozenTrial) -> float:
        return (t.datetime_complete - t0).total_seconds()

    within = [t for t in trials if t.datetime_complete is not None and at(t) <= args.budget]
    done = [t for t in within if t.state == TrialState.COMPLETE and t.value is not None]
    reached = [at(t) for t in done if t.value >= args.target]
    return Outcome(
        sampler=sampler, seed=seed,
        trials=sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in within),
        best=max((t.value for t in done), default=math.nan),
        to_target=min(reached, default=math.inf),
        first_trial_s=t0.timestamp() - started,
    )


def summary(outcomes: list[Outcome], samplers: list[str]) -> str:
    def median_ttt(rows: list[Outcome]) -> float:
        # Seeds that never reached the target count as infinitely slow: the median is finite
        # only when at least half of the seeds reached it.
        return statistics.median([o.to_target for o in rows]) if rows else math.inf

    random_median = median_ttt([o for o in outcomes if o.sampler == "random"])
    lines = ["| sampler | pruner | seeds | trials (mean) | mean best acc | reached target | "
             "mean s to target | median s to target | speedup vs random |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for sampler in samplers:
        rows = [o for o in outcomes if o.sampler == sampler]
        if not rows:
            continue
        reached = [o.to_target for o in rows if math.isfinite(o.to_target)]
        med = median_ttt(rows)
        speedup = random_median / med if math.isfinite(med) and math.isfinite(random_median) else math.nan
        lines.append(
            f"| {sampler} | {PRUNER[sampler]} | {len(rows)} | {statistics.mean(o.trials for o in rows):.1f} | "
            f"{_fmt(statistics.mean(o.best for o in rows), '.4f')} | {len(reached)}/{len(rows)} | "
            f"{_fmt(statistics.mean(reached) if reached else math.inf, '.0f')} | {_fmt(med, '.0f')} | "
            f"{_fmt(speedup, '.2f')} |")
    return "\n".join(lines)


def _fmt(x: float, spec: str) -> str:
    return "-" if not math.isfinite(x) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=240, help="wall-clock seconds per study (default: 240)")
    p.add_argument("--seeds", type=int, default=2, help="study seeds per sampler (default: 2)")
    p.add_argument("--target", type=float, default=0.645, help="val accuracy to reach (default: 0.645)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per trial (default: 4)")
    p.add_argument("--samplers", nargs="+", default=["tpe", "random", "grid"], choices=list(PRUNER))
    p.add_argument("--space", type=Path, default=SPACE, help=f"search space (default: {SPACE.relative_to(REPO)})")
    p.add_argument("--data", type=Path, default=data_root(), help="image folder (default: the shared 3k photos)")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/search",
                   help="stores, logs and the image cache (default: bench/out/search)")
    args = p.parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"skipped: no image folder at {args.data} (set CATDOG_KAGGLE or --data)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{args.out / time.strftime('search-%Y%m%d-%H%M%S.db')}"  # fresh: no resume
    print(f"budget {args.budget:.0f} s per study, target val acc {args.target}, {args.epochs} epochs per trial, "
          f"space {args.space.name}, store {store}", flush=True)
    outcomes = []
    for seed in range(args.seeds):
        for sampler in args.samplers:  # interleaved, so a change in machine load hits every sampler
            o = one_study(sampler, seed, args, store, args.out)
            outcomes.append(o)
            print(f"{sampler:<6} seed {seed}: {o.trials:3d} trials, best {_fmt(o.best, '.4f')}, "
                  f"target at {_fmt(o.to_target, '.0f')} s (first trial after {o.first_trial_s:.0f} s of set-up)",
                  flush=True)
    print()
    print(summary(outcomes, args.samplers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
