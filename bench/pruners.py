"""Pruners against each other: the same TPE study and wall-clock budget with each pruner.

    .venv/bin/python bench/pruners.py                # 20m each on ../shared/data/catdog-kaggle-3k
    .venv/bin/python bench/pruners.py --quick        # 5m each
    .venv/bin/python bench/pruners.py --dataset synthetic --space quick --budget 30s --pruners median none  # smoke

Each pruner gets a fresh study (one after the other, never sharing the cores) with --budget and
as many trials as fit. The table: trials finished, of them pruned, best val accuracy, points over
the baseline, and the seconds until the study first came within 1 point of its own final best.
The default pruner is the one with the best val accuracy at equal budget (ties: the most
finished trials, then the faster).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget import data_flags, fmt, reached, run_study  # noqa: E402  (bench/budget.py)

PRUNERS = ("median", "patient", "sha", "hyperband", "none")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default=None, help="per study (default 20m; --quick: 5m)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=PRUNERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--space", default=None)
    args = p.parse_args(argv)
    budget = args.budget or ("5m" if args.quick else "20m")
    data = data_flags(args)
    if data is None:
        print("skipped: no data (../shared/data/catdog-kaggle-3k absent; pass --data DIR or --dataset NAME)")
        return 0
    common = [*data, "--sampler", "tpe", "--budget", budget, "--seed", str(args.seed)]
    common += ["--space", args.space] if args.space else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="catdog-bench-pruners-") as tmp:
        for pruner in args.pruners:
            r = run_study(Path(tmp), f"pruner-{pruner}", [*common, "--pruner", pruner])
            import optuna

            from catdog_hpo.search.record import TrialKey

            study = optuna.load_study(study_name=r["name"], storage=f"sqlite:///{tmp}/{r['name']}.db")
            r["pruned"] = sum(t.state.name == "PRUNED" and TrialKey.REJECTED not in t.user_attrs for t in study.trials)
            r["near_best_s"] = reached(r["curve"], None if r["best"] is None else r["best"] - 0.01)
            rows.append((pruner, r))
    print(f"\nTPE, --budget {budget} per pruner, seed {args.seed}, data {' '.join(data)}\n")
    print("| pruner | finished trials | pruned | turned away | best val acc | points over baseline | s to within 1 pt of best |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for pruner, r in rows:
        print(f"| {pruner} | {r['finished']} | {r['pruned']} | {r['rejected']} | {fmt(r['best'], '.4f')} | "
              f"{fmt(r['over_baseline'], '+.1f')} | {fmt(r['near_best_s'], '.0f')} |")
    # Best val accuracy first; on a tie the search's throughput (finished trials), then the faster.
    ranked = sorted((r["best"] or 0.0, r["finished"], -(r["near_best_s"] or 1e9), pruner) for pruner, r in rows)
    print(f"\nbest at this budget: {ranked[-1][2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
