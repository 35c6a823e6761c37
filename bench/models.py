"""Issue 23's benchmark: a 100-trial TPE search per space and data set, its export, its retrain.

Each arm is what a user runs, in a fresh working folder of its own (its own studies/ store,
decoded-image cache, exports and models; the images are decoded inside the run, as from a fresh
clone):

    catdog-hpo run --sampler tpe --trials 100 --budget 60m [--space SPACE] DATA --study ARM --storage ...
    catdog-hpo export --study ARM --storage ...
    <the retrain command export printed>

then the study is read back from its store (through optuna) and retrain's metrics.json, and one
markdown table row per arm is printed: finished trials (complete / pruned / failed), wall
minutes, the baseline's and the best val accuracy, the minute the best was first reached,
retrain's val accuracy and its difference to the trial's value, and a pass/fail column against
the issue's targets: best val >= 0.85 on the photos, >= 0.88 on CIFAR cats/dogs; 100 finished
trials within the 60 minutes; retrain within 1 point of the trial.

Arms (--arms, comma-separated; default all):
    photos-default   the run command's default space on ../shared/data/catdog-kaggle-3k
                     ($CATDOG_KAGGLE elsewhere; 2,000 train / 1,000 val photos)
    photos-NAME      each --space given (a built-in name or a file; NAME its stem, default
                     bench/spaces/photos-tricks.yaml: arm photos-tricks), on the photos
    cifar            --cifar-space (default bench/spaces/cifar32.yaml) on
                     ../shared/data/cifar10-catdog-train, --val-fraction 0.2 (8,000 / 2,000 at 32 px)

    # full: about 1 hour per arm (plus retrain: minutes), one arm at a time, on an idle CPU
    .venv/bin/python bench/models.py --out /work/runs/models
    .venv/bin/python bench/models.py --out /work/runs/models --arms cifar     # one arm now, the rest later
    # smoke: small symlinked subsets (100 + 50 photos per class, CIFAR's first 1,000 of each class
    # as bench/budget.py --quick takes them), --budget 2m --trials 10 --epochs 2: about 10 minutes
    .venv/bin/python bench/models.py --quick

With --out, an arm whose step (run, export, retrain) already finished there is read back, not
rerun; an arm that ran other flags there is refused (use another --out). The table is also
written to OUT/models.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
EXE = str(Path(sys.executable).with_name("catdog-hpo"))
PHOTOS = ROOT.parent / "shared" / "data" / "catdog-kaggle-3k"
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-catdog-train"
PHOTOS_SPACE = BENCH / "spaces" / "photos-tricks.yaml"
CIFAR_SPACE = BENCH / "spaces" / "cifar32.yaml"
CIFAR_VAL_FRACTION = "0.2"  # the folder has no split: a fifth of each class validates
TARGETS = {"photos": 0.85, "cifar": 0.88}  # issue 23: best val accuracy per data set
RETRAIN_TOLERANCE = 0.01  # retrain's val within 1 point of the trial's value
QUICK_PHOTOS = {"train": 100, "val": 50}  # photos per class and split in the --quick subset


@dataclass(frozen=True)
class Arm:
    name: str  # the study name and the folder under --out
    data: str  # "photos" | "cifar"
    space: str | None  # a built-in name, a file's absolute path, or None: the run command's default

    @property
    def space_label(self) -> str:
        if self.space is None:
            return "default (seed-cnn)"
        path = Path(self.space)
        return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else self.space


# --------------------------------------------------------------------------- arms and data


def _space_arg(space: str) -> str:
    """A file by absolute path (the commands run in the arm's folder); a built-in name as given."""
    path = Path(space)
    return str(path.resolve()) if path.is_file() else space


def _space_stem(space: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(space).stem if Path(space).suffix else space)


def all_arms(args: argparse.Namespace) -> list[Arm]:
    arms = [Arm("photos-default", "photos", None)]
    for space in args.space:
        stem = _space_stem(space)
        arms.append(Arm(stem if stem.startswith("photos-") else f"photos-{stem}", "photos", _space_arg(space)))
    arms.append(Arm("cifar", "cifar", _space_arg(args.cifar_space)))
    return arms


def data_flags(arm: Arm, args: argparse.Namespace, out: Path) -> tuple[list[str], str] | None:
    """The run command's data flags for ``arm`` and a short label; None when the data are absent."""
    if arm.data == "photos":
        photos = Path(args.photos)
        if not (photos / "train").is_dir():
            return (["--dataset", "synthetic"], "synthetic (no photos)") if args.quick else None
        if args.quick:
            subset = photos_subset(photos, out / "data" / "catdog-kaggle-quick")
            n = QUICK_PHOTOS
            return ["--data", str(subset)], f"photos subset {2 * n['train']}/{2 * n['val']}"
        return ["--data", str(photos.resolve())], f"{photos.name} 2000/1000"
    cifar = Path(args.cifar)
    if not cifar.is_dir():
        return (["--dataset", "synthetic"], "synthetic (no CIFAR)") if args.quick else None
    if args.quick:
        subset = cifar_subset(cifar, out / "data")
        return ["--data", str(subset), "--val-fraction", CIFAR_VAL_FRACTION], f"CIFAR subset ({subset.name}, 20% val)"
    return ["--data", str(cifar.resolve()), "--val-fraction", CIFAR_VAL_FRACTION], f"{cifar.name} (20% val)"


def cifar_subset(cifar: Path, folder: Path) -> Path:
    """bench/budget.py --quick's subset (links to the first 1,000 images of each class)."""
    sys.path.insert(0, str(BENCH))
    import budget  # bench/budget.py

    if cifar.resolve() != budget.QUICK_DATA.resolve():
        raise SystemExit(f"--quick takes its CIFAR subset from {budget.QUICK_DATA} (bench/budget.py), not {cifar}")
    folder.mkdir(parents=True, exist_ok=True)
    return budget.quick_subset(folder)


def photos_subset(photos: Path, dest: Path) -> Path:
    """Links to the first QUICK_PHOTOS images of each class and split of the photo folder (its
    train/val layout kept; bench/budget.py's link_first, once per split). No image is copied; the
    shared folder stays read-only."""
    sys.path.insert(0, str(BENCH))
    import budget  # bench/budget.py

    for split, per_class in QUICK_PHOTOS.items():
        budget.link_first(photos / split, dest / split, per_class)
    return dest


# --------------------------------------------------------------------------- the three steps


def _cli(cmd: list[str], cwd: Path, log: Path) -> tuple[int, str, float]:
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)  # the caller reads rc
    wall = time.time() - start
    log.write_text(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc.returncode, proc.stdout + proc.stderr, wall


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def step_done(folder: Path, step: str) -> dict[str, Any] | None:
    done = folder / f"{step}.done.json"
    return json.loads(done.read_text()) if done.is_file() else None


def mark_done(folder: Path, step: str, record: dict[str, Any]) -> None:
    (folder / f"{step}.done.json").write_text(json.dumps(record, indent=2) + "\n")


def run_arm(arm: Arm, flags: list[str], folder: Path) -> dict[str, Any]:
    """The search, unless it finished in ``folder`` before with the same flags."""
    done = step_done(folder, "run")
    if done is not None:
        if done["flags"] != flags:
            raise SystemExit(f"{arm.name} in {folder} ran `{shlex.join(done['flags'])}`, not `{shlex.join(flags)}`: "
                             "use another --out, or remove that folder")
        print(f"{arm.name}: run read back from {folder}", flush=True)
        return done
    for stale in ("export", "retrain"):  # an earlier, unfinished run: its later steps are void
        (folder / f"{stale}.done.json").unlink(missing_ok=True)
    (folder / "study.db").unlink(missing_ok=True)
    cmd = [EXE, "run", *flags]
    print(f"{arm.name}: {shlex.join(cmd)}  (in {folder})", flush=True)
    rc, text, wall = _cli(cmd, folder, folder / "run.log")
    if rc not in (0, 1):  # 1: no trial completed, still the arm's result
        raise SystemExit(f"{arm.name}: run exited {rc}: {_last_line(text)} (log: {folder / 'run.log'})")
    record = {"flags": flags, "rc": rc, "wall_s": round(wall, 1),
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    mark_done(folder, "run", record)
    return record


def export_arm(arm: Arm, storage: str, folder: Path) -> dict[str, Any]:
    """`catdog-hpo export` of the best trial; the retrain command it printed."""
    done = step_done(folder, "export")
    if done is not None:
        return done
    cmd = [EXE, "export", "--study", arm.name, "--storage", storage]
    rc, text, wall = _cli(cmd, folder, folder / "export.log")
    lines = text.splitlines()
    command = next((lines[i + 1].strip() for i, line in enumerate(lines[:-1]) if line.startswith("reproduce it with")), None)
    record = {"rc": rc, "wall_s": round(wall, 1), "command": command,
              "error": None if rc == 0 and command else _last_line(text)}
    mark_done(folder, "export", record)
    return record


def retrain_arm(arm: Arm, command: str, folder: Path) -> dict[str, Any]:
    """The printed retrain command (its `catdog-hpo` this venv's), in the arm's folder."""
    done = step_done(folder, "retrain")
    if done is not None and done.get("command") == command:
        return done
    argv = shlex.split(command)
    if argv[0] != "catdog-hpo" or "--config" not in argv:
        raise SystemExit(f"{arm.name}: export printed an unexpected retrain command: {command}")
    cmd = [EXE, *argv[1:], "--no-progress"]
    print(f"{arm.name}: {shlex.join(cmd)}", flush=True)
    rc, text, wall = _cli(cmd, folder, folder / "retrain.log")
    config = Path(argv[argv.index("--config") + 1])
    metrics = folder / "studies" / "models" / config.stem / "metrics.json"  # retrain's default --out
    record = {"command": command, "rc": rc, "wall_s": round(wall, 1),
              "metrics": str(metrics) if metrics.is_file() else None,
              # 1: checkpoint and metrics written, a model format's export failed
              "error": None if rc == 0 else _last_line(text)}
    mark_done(folder, "retrain", record)
    return record


# --------------------------------------------------------------------------- reading back


def read_study(name: str, storage: str) -> dict[str, Any]:
    """The finished study's numbers, through optuna and the record's documented trial
    attributes (docs/record.md: `rejected`, `stopped_early`, `baseline`)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    rejected = [t for t in trials if "rejected" in t.user_attrs]  # turned away before training
    trained = [t for t in trials if "rejected" not in t.user_attrs]
    stopped = [t for t in trained if t.state == TrialState.COMPLETE and t.user_attrs.get("stopped_early") is not None]
    complete = [t for t in trained if t.state == TrialState.COMPLETE and t not in stopped and t.values]
    pruned = sum(t.state == TrialState.PRUNED for t in trained) + len(stopped)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    t0 = min(starts) if starts else None
    best = max(complete, key=lambda t: (t.values[0], -t.number), default=None)
    first_best = None
    if best is not None and t0 is not None:
        at_best = [t for t in complete if t.values[0] >= best.values[0] - 1e-12 and t.datetime_complete]
        first_best = min(at_best, key=lambda t: t.datetime_complete)
    baseline = next((t for t in trials if t.user_attrs.get("baseline")), None)
    return {
        "trials": len(trials), "complete": len(complete), "pruned": pruned, "failed": failed,
        "rejected": len(rejected), "finished": len(complete) + pruned,
        "span_min": (max(ends) - t0).total_seconds() / 60 if t0 and ends else None,
        "best": best.values[0] if best else None, "best_trial": best.number if best else None,
        "best_at_min": (first_best.datetime_complete - t0).total_seconds() / 60 if first_best else None,
        "baseline": baseline.values[0] if baseline is not None and baseline.state == TrialState.COMPLETE
        and baseline.values else None,
    }


def read_retrain(record: dict[str, Any] | None) -> dict[str, Any]:
    if not record or not record.get("metrics"):
        return {}
    m = json.loads(Path(record["metrics"]).read_text())
    rep = m.get("reproduction") or {}
    return {"val": m["val_acc"]["mean"], "trial": rep.get("trial"), "trial_val": rep.get("trial_val_acc"),
            "comparable": rep.get("comparable"), "device": m.get("device")}


# --------------------------------------------------------------------------- the table


def parse_minutes(budget: str) -> float:
    """The run command's duration syntax (90s, 45m, 2h or seconds) in minutes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", budget)
    if not m:
        raise SystemExit(f"--budget {budget}: expected e.g. 90s, 45m, 2h or seconds")
    return float(m.group(1)) * {"": 1 / 60, "s": 1 / 60, "m": 1.0, "h": 60.0}[m.group(2)]


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def verdict(arm: Arm, s: dict[str, Any], r: dict[str, Any], trials: int, budget_min: float) -> str:
    target = TARGETS[arm.data]
    misses = []
    if s["best"] is None or s["best"] < target:
        misses.append(f"best < {target:.2f}")
    if s["finished"] < trials or (s["span_min"] or 0) > budget_min:
        misses.append(f"{s['finished']}/{trials} trials in {budget_min:g} min")
    diff = None if not r or s["best"] is None else r["val"] - s["best"]
    if diff is None or abs(diff) > RETRAIN_TOLERANCE + 1e-9:
        misses.append("retrain off by > 1 pt" if diff is not None else "no retrain")
    return "pass" if not misses else "FAIL: " + "; ".join(misses)


def table(rows: list[tuple[Arm, str, dict[str, Any], dict[str, Any], dict[str, Any]]], trials: int,
          budget_min: float) -> str:
    out = [("| arm | space | data | finished (complete / pruned / failed) | turned away | wall min | baseline val "
            "| best val (trial) | best first at min | retrain val | retrain - trial | targets |"),
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for arm, label, run, s, r in rows:
        diff = None if not r or s["best"] is None else round(100 * (r["val"] - s["best"]), 3) + 0.0  # float noise: no "-0.0"
        best = f"{_f(s['best'], '.4f')} (#{s['best_trial']})" if s["best"] is not None else "-"
        note = "" if not r or r.get("comparable") is not False else " (not comparable)"
        out.append(f"| {arm.name} | {arm.space_label} | {label} | {s['finished']} ({s['complete']} / {s['pruned']} / "
                   f"{s['failed']}) | {s['rejected']} | {run['wall_s'] / 60:.1f} | {_f(s['baseline'], '.4f')} | {best} | "
                   f"{_f(s['best_at_min'], '.1f')} | {_f(r.get('val'), '.4f')} | "
                   f"{_f(diff, '+.1f')} pt{note} | {verdict(arm, s, r, trials, budget_min)} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def default_out(quick: bool) -> Path:
    runs = Path("/work/runs")
    name = "models-quick" if quick else "models"
    return runs / name if runs.is_dir() and os.access(runs, os.W_OK) else Path(tempfile.mkdtemp(prefix=f"catdog-{name}-"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--arms", default=None, help="arms to run now, comma-separated (default: all; see below)")
    p.add_argument("--space", action="append", default=None,
                   help="a space (built-in name or file) for an arm photos-NAME; repeatable "
                        f"(default: {PHOTOS_SPACE.relative_to(ROOT)})")
    p.add_argument("--cifar-space", default=str(CIFAR_SPACE), help="the cifar arm's space (default: %(default)s)")
    p.add_argument("--photos", default=os.environ.get("CATDOG_KAGGLE") or str(PHOTOS),
                   help="the photo folder, train/ and val/ (default: $CATDOG_KAGGLE or %(default)s)")
    p.add_argument("--cifar", default=str(CIFAR), help="CIFAR-10 cats/dogs, no split (default: %(default)s)")
    p.add_argument("--budget", default=None, help="run --budget per arm (default 60m; --quick: 2m)")
    p.add_argument("--trials", type=int, default=None, help="run --trials per arm (default 100; --quick: 10)")
    p.add_argument("--epochs", type=int, default=None,
                   help="run --epochs for every arm (default: each space's; --quick: 2)")
    p.add_argument("--seed", type=int, default=0, help="run --seed (default: 0)")
    p.add_argument("--out", default=None, help="working folders, one per arm; a step finished there is read back "
                   "(default: /work/runs/models, or models-quick, else a temporary folder)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small symlinked subsets of the photos and CIFAR, --budget 2m --trials 10 --epochs 2")
    args = p.parse_args(argv)
    args.space = args.space or [str(PHOTOS_SPACE)]
    args.budget = args.budget or ("2m" if args.quick else "60m")
    args.trials = args.trials or (10 if args.quick else 100)
    # --quick: 2 epochs, or the cost model's first prices (a 20-epoch trial: minutes on a loaded
    # CPU) leave nothing of a 2-minute budget to admit, and nothing gets exported or retrained
    args.epochs = args.epochs or (2 if args.quick else None)
    names = [a.name for a in all_arms(args)]
    args.arms = names if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in names]
    if unknown:
        p.error(f"--arms: unknown arm {unknown[0]!r} (arms: {', '.join(names)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve() if args.out else default_out(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    budget_min = parse_minutes(args.budget)
    rows, notes = [], []
    for arm in all_arms(args):
        folder = out / arm.name
        data = data_flags(arm, args, out)
        if data is None:
            notes.append(f"{arm.name}: skipped, its data are absent ({args.photos if arm.data == 'photos' else args.cifar})")
            continue
        flags, label = data
        storage = f"sqlite:///{folder / 'study.db'}"
        run_flags = ["--study", arm.name, "--storage", storage, "--sampler", "tpe", "--trials", str(args.trials),
                     "--budget", args.budget, "--seed", str(args.seed), "--no-progress",
                     *([] if arm.space is None else ["--space", arm.space]), *flags,
                     *([] if args.epochs is None else ["--epochs", str(args.epochs)])]
        if arm.name not in args.arms and step_done(folder, "run") is None:
            notes.append(f"{arm.name}: not run yet (--arms)")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        run = run_arm(arm, run_flags, folder)
        study = read_study(arm.name, storage)
        retrain: dict[str, Any] = {}
        if study["complete"]:
            exported = export_arm(arm, storage, folder)
            if exported["error"]:
                notes.append(f"{arm.name}: export failed: {exported['error']}")
            else:
                rec = retrain_arm(arm, exported["command"], folder)
                retrain = read_retrain(rec)
                if rec["error"]:
                    notes.append(f"{arm.name}: retrain exited {rec['rc']}: {rec['error']}")
                if retrain and retrain.get("trial") not in (None, study["best_trial"]):
                    notes.append(f"{arm.name}: export picked trial {retrain['trial']}, the best is {study['best_trial']}")
        else:
            notes.append(f"{arm.name}: no trial completed: nothing to export")
        rows.append((arm, label, run, study, retrain))
    header = (f"bench/models.py{' --quick' if args.quick else ''}: tpe, --trials {args.trials} --budget {args.budget}"
              f"{'' if args.epochs is None else f' --epochs {args.epochs}'}, seed {args.seed}; folders in {out}")
    text = "\n".join([header, "", table(rows, args.trials, budget_min), *([""] + [f"- {n}" for n in notes] if notes else [])])
    (out / "models.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
