"""A fair search benchmark on one wall-clock budget: three arms, several seeds each.

    (a) tpe-default     TPE    + the run command's default pruner (sha)
    (b) random-default  random + the same default pruner       a vs b: the sampler's effect
    (c) tpe-nopruner    TPE    + --pruner none                  a vs c: the pruner's effect

Every (arm, seed) is a real `catdog-hpo run` subprocess (`--seed S`, `--budget`, no `--trials`: as
many trials as fit) with its own study name in its own fresh SQLite store, one at a time (seed
after seed, the three arms within a seed), so no two share the cores. The arms differ in their
sampler or pruner flag only; the validation split is the same for all (split seed 0).

    # full: ../shared/data/catdog-kaggle-3k, the seed-cnn space, 60m per arm: 3 x 3 x 60m = about 9.2 hours
    .venv/bin/python bench/budget.py --out runs/fair60
    # quick: CIFAR-10 cats/dogs at 32 px (the first 1,000 of each class of
    # ../shared/data/cifar10-catdog-train, 20% held out), bench/cifar32.yaml, 4m per arm:
    # 9 studies, about 40 minutes on the 2-core CPU
    .venv/bin/python bench/budget.py --quick --out runs/fair4
    # in pieces: one arm (or a,c) or some seeds now, the rest later into the same folder; a study
    # already finished there is read, not rerun; the table covers every finished one
    .venv/bin/python bench/budget.py --quick --out runs/fair4 --only a --seeds 0
    # smoke (about 3.5 minutes; the cost model calibrates inside each budget: 10-60 s)
    .venv/bin/python bench/budget.py --dataset synthetic --space quick --epochs 2 --budget 60s --seeds 0

Prints three markdown tables: one row per study (finished, pruned and turned-away trials, best val
accuracy, points over the baseline, wall seconds, when it first reached its own final best); one
row per arm (median and min..max over the seeds of best val acc, finished trials, wall seconds and
that time); and a line per comparison: the median bests' difference (and the per-seed paired
differences), and when each arm first reached the other's median best (fraction of the budget,
"never" counting as slowest). Times run from the first trial's start; the images are decoded into
the folder's cache before the first study, so no arm's wall time includes decoding.

Replaced (2026-12): the earlier script compared TPE + SHA with `--trials 100` against random
search without pruning, one seed each, so its "reached random's best at" mixed the sampler's
effect with the pruner's. `--only` now takes arm letters (a, b, c) instead of tpe/random;
`--trials` (default: none) and `--epochs` (default: the space's) apply to every arm alike.
`run_study`, `data_flags`, `reached` and `fmt` keep their signatures (bench/pruners.py uses them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLI = [sys.executable, "-m", "catdog_hpo"]
QUICK_DATA = ROOT.parent / "shared" / "data" / "cifar10-catdog-train"
QUICK_SPACE = ROOT / "bench" / "cifar32.yaml"
QUICK_VAL_FRACTION = "0.2"  # the folder has no split: a fifth of the images validate
# Images per class the quick variant takes from that folder (the first, by name): 1,600 train /
# 400 val. All 10,000 cost 17 s per epoch at 32 px on the 2-core CPU, so a 9-epoch trial would
# not fit a 4-minute arm twice; at a fifth of that, SHA's 1-epoch rung costs about 3.5 s.
QUICK_PER_CLASS = 1000


@dataclass(frozen=True)
class Arm:
    key: str  # a, b, c: what --only takes
    name: str
    sampler: str
    pruner: str | None  # None: the run command's default, the same for a and b whatever it is

    def flags(self) -> list[str]:
        return ["--sampler", self.sampler] + ([] if self.pruner is None else ["--pruner", self.pruner])


ARMS = (Arm("a", "tpe-default", "tpe", None), Arm("b", "random-default", "random", None),
        Arm("c", "tpe-nopruner", "tpe", "none"))
COMPARISONS = (("sampler effect", "a", "b"), ("pruner effect", "a", "c"))


# --------------------------------------------------------------------------- one study


def data_flags(args: argparse.Namespace) -> list[str] | None:
    """The run command's data flags, or None when the default folder is absent."""
    if args.dataset:
        return ["--dataset", args.dataset]
    if getattr(args, "quick", False) and not args.data:
        if not QUICK_DATA.is_dir():
            return None
        return ["--data", str(quick_subset(Path(args.out or tempfile.gettempdir()).resolve())),
                "--val-fraction", QUICK_VAL_FRACTION]
    from helpers import kaggle_path

    path = Path(args.data) if args.data else kaggle_path()
    # resolved: the subprocess runs in the output folder
    return ["--data", str(path.resolve())] if path is not None and path.is_dir() else None


def quick_subset(out: Path) -> Path:
    """A folder of links to the first QUICK_PER_CLASS images of each class of QUICK_DATA (the
    shared folder is read-only, and no image is copied)."""
    return link_first(QUICK_DATA, out / f"cifar10-catdog-{QUICK_PER_CLASS}", QUICK_PER_CLASS)


def link_first(classes: Path, dest: Path, per_class: int) -> Path:
    """``dest/<class>/`` with links to the first ``per_class`` images (by name) of each class
    folder of ``classes``; links already there are kept. Returns ``dest``."""
    for cls in sorted(p for p in classes.iterdir() if p.is_dir()):
        target = dest / cls.name
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted(cls.iterdir())[:per_class]:
            link = target / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return dest


def run_study(workdir: Path, name: str, flags: list[str]) -> dict[str, Any]:
    """Run one study to the end in ``workdir`` unless it finished there before; its numbers."""
    storage = f"sqlite:///{workdir}/{name}.db"
    if not done_file(workdir, name).exists():
        _run_cli(workdir, name, storage, flags)
    wall = _check_done(workdir, name, flags)
    return {**read_study(name, storage), "wall": wall}


def done_file(workdir: Path, name: str) -> Path:
    return workdir / f"{name}.done.json"


def _run_cli(workdir: Path, name: str, storage: str, flags: list[str]) -> None:
    (workdir / f"{name}.db").unlink(missing_ok=True)  # an unfinished earlier run: start afresh
    start = time.time()
    proc = subprocess.run([*CLI, "run", "--study", name, "--storage", storage, "--no-progress", *flags],
                          cwd=workdir, capture_output=True, text=True)
    (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 1):  # 1: no trial completed, still a result of the arm
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    # Written last, with the flags: its presence marks the study finished and what it ran
    done_file(workdir, name).write_text(json.dumps({"wall_s": round(time.time() - start, 1), "flags": flags}))


def _check_done(workdir: Path, name: str, flags: list[str]) -> float:
    """The finished study's wall seconds; exits when it ran other flags (a reused --out)."""
    done = json.loads(done_file(workdir, name).read_text())
    if done["flags"] != flags:
        raise SystemExit(f"{name} in {workdir} ran `{' '.join(done['flags'])}`, not `{' '.join(flags)}`: "
                         "use another --out, or remove its files")
    return float(done["wall_s"])


def read_study(name: str, storage: str) -> dict[str, Any]:
    """A finished study's numbers, from its store (the record's keys, via search.record)."""
    import optuna
    from optuna.trial import TrialState

    from catdog_hpo.search.budget import spent_seconds
    from catdog_hpo.search.record import StudyInfo, TrialRecord, counts_toward_n, from_history
    from catdog_hpo.search.study import baseline_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    info = StudyInfo.from_study(study)
    # its own trials: a --warm-start history trial ran in another study (bench/warm_start.py)
    trials = [t for t in study.get_trials(deepcopy=False) if not from_history(t)]
    records = [TrialRecord.from_trial(t) for t in trials]
    done = [t for t, r in zip(trials, records)
            if t.state == TrialState.COMPLETE and t.value is not None and not r.rejected]
    t0 = min((t.datetime_start for t in trials if t.datetime_start), default=None)
    curve = sorted(((t.datetime_complete - t0).total_seconds(), t.value) for t in done) if t0 else []
    best = max((v for _, v in curve), default=None)
    base = baseline_trial(study)
    return {"name": name, "sampler": info.sampler, "pruner": info.pruner, "seed": info.seed,
            "budget_s": info.budget_s, "spent": spent_seconds(study),
            "finished": sum(counts_toward_n(t) for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED and not r.rejected for t, r in zip(trials, records)),
            "rejected": sum(bool(r.rejected) for r in records),
            "best": best, "curve": curve,
            "own_best_at": _fraction(reached(curve, best), info.budget_s),
            "over_baseline": None if best is None or base is None or base.value is None else 100 * (best - base.value)}


def reached(curve: list[tuple[float, float]], target: float | None) -> float | None:
    """Seconds until the curve first reached ``target``."""
    if target is None:
        return None
    return next((s for s, v in curve if v >= target - 1e-12), None)


def _fraction(seconds: float | None, budget_s: float | None) -> float:
    """Seconds as a fraction of the budget; inf for never (the slowest, in a median)."""
    return math.inf if seconds is None or not budget_s else seconds / budget_s


def warm_cache(workdir: Path, flags: list[str]) -> None:
    """Decode the images into the run command's cache under ``workdir`` before the first study,
    so the first arm's wall time is not the only one with the decoding in it."""
    from catdog_hpo.cli import build_parser
    from catdog_hpo.cli.common import STUDIES_DIR, data_source
    from catdog_hpo.data import load_images
    from catdog_hpo.search.space_files import base_image_size, load_space

    args = build_parser().parse_args(["run", *flags])  # the run command's own defaults (space, split)
    with contextlib.chdir(workdir):  # its cache and built-in datasets are relative to its cwd
        load_images(data_source(args), base_image_size(load_space(args.space)), STUDIES_DIR / "cache")


# --------------------------------------------------------------------------- the tables


def fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    return "never" if isinstance(v, float) and math.isinf(v) else format(v, spec)


def spread(values: list[float], spec: str) -> str:
    """'median (min..max)' over the seeds; one value when they agree."""
    if not values:
        return "-"
    if min(values) == max(values):
        return fmt(values[0], spec)
    return f"{fmt(statistics.median(values), spec)} ({fmt(min(values), spec)}..{fmt(max(values), spec)})"


def _bests(rows: list[dict[str, Any]]) -> list[float]:
    return [r["best"] for r in rows if r["best"] is not None]


def print_studies(results: dict[str, list[dict[str, Any]]]) -> None:
    print("| study | sampler | pruner | finished | pruned | turned away | best val acc | points over baseline "
          "| wall (s) | budget spent (s) | reached own best at |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in results.values():
        for r in rows:
            print(f"| {r['name']} | {r['sampler']} | {r['pruner']} | {r['finished']} | {r['pruned']} | "
                  f"{r['rejected']} | "
                  f"{fmt(r['best'], '.4f')} | {fmt(r['over_baseline'], '+.1f')} | {r['wall']:.0f} | {r['spent']:.0f} | "
                  f"{fmt(r['own_best_at'], '.2f')} |")


def print_arms(results: dict[str, list[dict[str, Any]]]) -> None:
    print("| arm | sampler | pruner | seeds | best val acc | finished trials | wall (s) "
          "| reached own best at (of budget) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for arm in ARMS:
        rows = results.get(arm.key, [])
        if not rows:
            continue
        print(f"| {arm.key} {arm.name} | {rows[0]['sampler']} | {rows[0]['pruner']} | {len(rows)} | "
              f"{spread(_bests(rows), '.4f')} | {spread([r['finished'] for r in rows], '.0f')} | "
              f"{spread([r['wall'] for r in rows], '.0f')} | {spread([r['own_best_at'] for r in rows], '.2f')} |")


def comparison(label: str, first: list[dict[str, Any]], second: list[dict[str, Any]], keys: tuple[str, str]) -> str:
    """One line: the median bests' difference, the paired per-seed differences, and when each arm
    first reached the other's median best (median over its seeds, fraction of the budget)."""
    x, y = keys
    if not _bests(first) or not _bests(second):
        return f"- {label} ({x} - {y}): not both arms have a result yet"
    mx, my = statistics.median(_bests(first)), statistics.median(_bests(second))
    by_seed = {r["seed"]: r["best"] for r in second}
    paired = [100 * (r["best"] - by_seed[r["seed"]]) for r in first
              if r["best"] is not None and by_seed.get(r["seed"]) is not None]
    x_at = [_fraction(reached(r["curve"], my), r["budget_s"]) for r in first]
    y_at = [_fraction(reached(r["curve"], mx), r["budget_s"]) for r in second]
    return (f"- {label} ({x} - {y}): {100 * (mx - my):+.1f} points of median best val acc ({mx:.4f} vs {my:.4f}; "
            f"paired by seed: {', '.join(f'{d:+.1f}' for d in paired) or '-'}); {x} reached {y}'s median best at "
            f"{spread(x_at, '.2f')} of the budget, {y} reached {x}'s at {spread(y_at, '.2f')}")


def report(results: dict[str, list[dict[str, Any]]], header: str, missing: list[str]) -> None:
    print(f"\n{header}\n")
    print_studies(results)
    print()
    print_arms(results)
    print()
    for label, x, y in COMPARISONS:
        print(comparison(label, results.get(x, []), results.get(y, []), (x, y)))
    if missing:
        print(f"\nnot run yet: {', '.join(missing)}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CIFAR-10 cats/dogs at 32 px, bench/cifar32.yaml, 4m per arm (about 38 minutes for 3 seeds)")
    p.add_argument("--seeds", default="0,1,2", help="study seeds, comma-separated (default: 0,1,2)")
    p.add_argument("--only", default=None, help="run just these arms now, e.g. a or a,c (needs --out)")
    p.add_argument("--out", default=None, help="keep stores and logs here; a study finished there is read, not rerun")
    # Overrides, for smoke runs and other data
    p.add_argument("--budget", default=None, help="per study (default 60m; --quick: 4m)")
    p.add_argument("--trials", type=int, default=None, help="--trials for every arm (default: as many as fit)")
    p.add_argument("--epochs", type=int, default=None, help="--epochs for every arm (default: the space's)")
    p.add_argument("--data", default=None, help="image folder (default: kaggle-3k; --quick: cifar10-catdog-train)")
    p.add_argument("--dataset", default=None, help="a built-in dataset instead (synthetic for a smoke run)")
    p.add_argument("--space", default=None,
                   help="search space (default: the run command's; --quick: bench/cifar32.yaml)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.only = None if args.only is None else [k.strip() for k in args.only.split(",") if k.strip()]
    if args.only and not set(args.only) <= {a.key for a in ARMS}:
        p.error(f"--only {','.join(args.only)}: arms are {', '.join(a.key for a in ARMS)}")
    if args.only and not args.out:
        p.error("--only needs --out (the other arms run later into the same folder)")
    return args


def common_flags(args: argparse.Namespace, data: list[str]) -> list[str]:
    budget = args.budget or ("4m" if args.quick else "60m")
    space = args.space or (str(QUICK_SPACE) if args.quick else None)
    if space is not None and Path(space).is_file():
        space = str(Path(space).resolve())  # the subprocess runs in the output folder
    return ([*data, "--budget", budget] + (["--space", space] if space else [])
            + (["--trials", str(args.trials)] if args.trials else [])
            + (["--epochs", str(args.epochs)] if args.epochs else []))


def study_name(arm: Arm, seed: int) -> str:
    return f"{arm.key}-{arm.name}-seed{seed}"


def study_flags(common: list[str], arm: Arm, seed: int) -> list[str]:
    return [*common, "--seed", str(seed), *arm.flags()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = data_flags(args)
    if data is None:
        print("skipped: no data (../shared/data/catdog-kaggle-3k or cifar10-catdog-train absent; "
              "pass --data DIR or --dataset NAME)")
        return 0
    common = common_flags(args, data)
    todo = [(arm, s) for s in args.seeds for arm in ARMS if args.only is None or arm.key in args.only]
    with tempfile.TemporaryDirectory(prefix="catdog-bench-budget-") as tmp:
        out = Path(args.out).resolve() if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if any(not done_file(out, study_name(arm, s)).exists() for arm, s in todo):
            warm_cache(out, common)
        for arm, seed in todo:  # seed after seed: a stopped run leaves whole seeds behind
            run_study(out, study_name(arm, seed), study_flags(common, arm, seed))
        results: dict[str, list[dict[str, Any]]] = {}
        missing = []
        for arm in ARMS:
            for seed in args.seeds:
                name = study_name(arm, seed)
                if done_file(out, name).exists():
                    results.setdefault(arm.key, []).append(run_study(out, name, study_flags(common, arm, seed)))
                else:
                    missing.append(name)
    report(results, f"budget {common[common.index('--budget') + 1]} per study, seeds {','.join(map(str, args.seeds))}; "
           f"flags: {' '.join(common)}", missing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
