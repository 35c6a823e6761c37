"""Trial checkpoints (issue 25): what they cost per epoch, and the work they save.

Four markdown tables:

0. Disk: the best-epoch weight files of the default space's models (the baseline; median, 90th
   percentile and largest of 400 random seed-cnn configs, sized on the meta device), what a
   100-trial study leaves with --keep-weights 3, and a running trial's two state files (up to 4x
   its weights each with Adam).
1. Overhead: seconds per epoch of ``engine.train.fit`` without and with a checkpoint after every
   epoch, for the seed-cnn baseline (the tutorial CNN, 64 px) and a ResNet-18 at 128 px on the
   CPU; the save's own seconds (timed around ``engine.resume.save``) as a share of the epoch
   without checkpoints, and the file's size. One process, the two runs back to back.
2. Lost work: one 20-epoch trial (the seed-cnn baseline) through the real CLI, SIGKILLed once
   its 15th epoch is saved (reported, without checkpoints), then the same command again (the
   heartbeat fails the dead trial and Optuna's stale-trial retry runs it): epochs trained in all
   and wall time, with checkpoints and with --checkpoint-every 0, against the uninterrupted run.
3. Chaos: two `catdog-hpo run` processes (two workers) on one SQLite study of N identical
   trials; three SIGKILLs, alternating victims, half an epoch after N x E x 1/4, 2/4, 3/4 epochs
   have been trained, each killed process replaced at once (a scheduler's restart): epochs trained in all
   and wall time, with and without checkpoints (a kill can find its victim between trials or
   waiting for one: the table counts the trials killed mid-training).

"Epochs trained" counts finished epochs: per trial, the epochs it reported minus those it took
over from a checkpoint (``resumed_from_epoch``). The epoch a kill cuts short is lost either way
and shows in the wall time only. Every run uses --heartbeat 2: a dead worker's trial is retried
after 6 s.

    .venv/bin/python bench/checkpoint.py                # ../shared/data/catdog-kaggle-3k (about 30 minutes)
    .venv/bin/python bench/checkpoint.py --quick        # synthetic images, small sizes (about 2 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sqlite3
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

import torch  # noqa: E402
import yaml  # noqa: E402

CLI = [sys.executable, "-m", "catdog_hpo"]
KAGGLE = ROOT.parent / "shared" / "data" / "catdog-kaggle-3k"
STUDY = "bench"
CACHE = ROOT / "studies" / "cache"  # decoded images, shared by every run here (so no run's wall time decodes)
HEARTBEAT = "2"  # seconds: a dead worker's trial is stale (and retried) after 3 x this


@dataclass(frozen=True)
class Scale:
    data: list[str]  # the run command's data flags
    cnn_px: int  # image size of the seed-cnn baseline
    resnet_px: int
    overhead_epochs: int  # per fit in measurement 1 (saves after all but the last)
    lost_epochs: int  # the trial of measurement 2
    kill_at: int  # ... killed once this epoch is saved
    chaos_trials: int
    chaos_epochs: int


FULL = Scale(["--data", str(KAGGLE)], 64, 128, 3, 20, 15, 4, 10)
QUICK = Scale(["--dataset", "synthetic"], 32, 64, 3, 20, 15, 4, 6)


# --------------------------------------------------------------------------- 1. overhead


def overhead(scale: Scale, workdir: Path) -> list[dict[str, Any]]:
    from catdog_hpo.config import ModelConfig, OptimConfig, TrainConfig, TrialConfig
    from catdog_hpo.data import DataSource, load_images
    from catdog_hpo.engine import resume
    from catdog_hpo.engine.resume import CheckpointSpec, fingerprint
    from catdog_hpo.engine.train import fit
    from catdog_hpo.search.space_files import load_space
    from catdog_hpo.search.spaces import resolve
    import optuna

    space = load_space("seed-cnn")
    cnn = resolve(space, optuna.trial.FixedTrial(dict(space.baseline)),
                  {"image_size": scale.cnn_px, "train.epochs": scale.overhead_epochs})
    resnet = TrialConfig(image_size=scale.resnet_px, model=ModelConfig(family="resnet18", fc_hidden=0, dropout=0.0),
                         optim=OptimConfig(name="adamw", lr=1e-3, scheduler="cosine"),
                         train=TrainConfig(epochs=scale.overhead_epochs, batch_size=64))
    source = DataSource(path=str(KAGGLE)) if scale is FULL else DataSource(name="synthetic")
    save, saves = resume.save, []

    def timed(*args: Any) -> bool:
        start = time.perf_counter()
        ok = save(*args)
        saves.append(time.perf_counter() - start)
        return ok

    resume.save = timed
    rows = []
    try:
        for name, cfg in (("seed-cnn baseline", cnn), ("ResNet-18", resnet)):
            data = load_images(source, cfg.image_size, CACHE)
            path = workdir / f"{name.split()[0]}.pt"
            key = fingerprint(cfg, len(data.classes), int(data.train_x.shape[0]))
            plain = fit(cfg, data, torch.device("cpu"))
            saves.clear()
            with_ck = fit(cfg, data, torch.device("cpu"), checkpoint=CheckpointSpec(path, 1, key=key))
            epoch_s = statistics.mean(h.seconds for h in plain.history)
            rows.append({"model": f"{name}, {cfg.image_size} px", "images": int(data.train_x.shape[0]),
                         "without": epoch_s, "with": statistics.mean(h.seconds for h in with_ck.history),
                         "save": statistics.mean(saves), "saves": len(saves), "mb": path.stat().st_size / 2**20,
                         "share": statistics.mean(saves) / epoch_s})
            print(f"  overhead {rows[-1]}", file=sys.stderr)
    finally:
        resume.save = save
    return rows


# --------------------------------------------------------------------------- the CLI runs


def run_flags(scale: Scale, space: str, trials: int, epochs: int, *extra: str) -> list[str]:
    return ["run", "--space", space, *scale.data, "--sampler", "random", "--pruner", "none", "--trials", str(trials),
            "--epochs", str(epochs), "--study", STUDY, "--device", "cpu", "--no-progress", "--heartbeat", HEARTBEAT,
            *extra]


def fresh(root: Path, name: str) -> Path:
    """A working folder whose studies/cache is the shared cache of decoded images."""
    workdir = root / name
    (workdir / "studies").mkdir(parents=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    (workdir / "studies" / "cache").symlink_to(CACHE)
    return workdir


def start(workdir: Path, flags: list[str], tag: str, threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(workdir / f"{tag}.out", "w") as out, open(workdir / f"{tag}.err", "w") as err:
        return subprocess.Popen([*CLI, *flags], cwd=workdir, stdout=out, stderr=err, start_new_session=True, env=env)


def db(workdir: Path) -> Path:
    return workdir / "studies" / "catdog.db"


def trained(workdir: Path) -> tuple[int, list[tuple[int, str, int, int]]]:
    """(epochs trained in all, per trial: number, state, epochs reported, epochs taken over)."""
    if not db(workdir).exists():
        return 0, []
    con = sqlite3.connect(db(workdir), timeout=30)
    try:
        rows = con.execute(
            "SELECT t.number, t.state, (SELECT COUNT(*) FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id), "
            "(SELECT a.value_json FROM trial_user_attributes a WHERE a.trial_id = t.trial_id "
            "AND a.key = 'resumed_from_epoch') FROM trials t").fetchall()
    except sqlite3.OperationalError:  # tables not made yet
        return 0, []
    finally:
        con.close()
    trials = [(n, s, reported, int(taken) if taken not in (None, "null") else 0) for n, s, reported, taken in rows]
    return sum(r - t for _, _, r, t in trials), trials


def saved_epoch(workdir: Path) -> int:
    """The highest epoch of any trial's saved state in the study's checkpoint folder (0: none)."""
    best = 0
    for path in (workdir / "studies" / "checkpoints").glob("*/*/trial-*.pt"):
        with contextlib.suppress(Exception):  # replaced while read: the next poll reads it
            best = max(best, int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]))
    return best


def wait(proc: subprocess.Popen, timeout: float = 7200) -> int:
    return proc.wait(timeout=timeout)


def kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --------------------------------------------------------------------------- 2. lost work


def lost_work(scale: Scale, root: Path) -> list[dict[str, Any]]:
    rows = []
    # trial 0 of the seed-cnn space is its baseline, the tutorial CNN (at the scale's image size)
    space = yaml.safe_load((ROOT / "search_spaces" / "seed-cnn.yaml").read_text())
    space["base"]["image_size"] = scale.cnn_px
    (root / "seed-cnn.yaml").write_text(yaml.safe_dump(space, sort_keys=False))  # params in order: "when" refers up
    flags = run_flags(scale, str(root / "seed-cnn.yaml"), 1, scale.lost_epochs)
    for arm, extra in (("uninterrupted", []), ("killed at epoch %d, checkpoints" % scale.kill_at, []),
                       ("killed at epoch %d, --checkpoint-every 0" % scale.kill_at, ["--checkpoint-every", "0"])):
        workdir = fresh(root, f"lost-{len(rows)}")
        started = time.perf_counter()
        proc = start(workdir, flags + extra, "a")
        if arm != "uninterrupted":
            checkpoints = not extra
            while proc.poll() is None:
                done = saved_epoch(workdir) if checkpoints else trained(workdir)[0]
                if done >= scale.kill_at:
                    break
                time.sleep(0.2)
            kill(proc)
            proc = start(workdir, flags + extra, "b")
        assert wait(proc) == 0, (workdir / "b.err").read_text() if (workdir / "b.err").exists() else ""
        wall = time.perf_counter() - started
        epochs, trials = trained(workdir)
        rows.append({"arm": arm, "epochs": epochs, "wall": wall, "trials": trials})
        print(f"  lost work {rows[-1]}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- 3. chaos


def chaos_space(scale: Scale) -> dict[str, Any]:
    """N identical trials: one config (3 blocks of 32 channels, FC 512, Adam, StepLR), one seed."""
    return {"name": "bench-chaos",
            "base": {"image_size": scale.cnn_px, "model": {"family": "cnn", "head": "fc", "fc_hidden": 512,
                                                           "dropout": 0.5},
                     "optim": {"name": "adam", "lr": 1e-3, "scheduler": "step", "step_size": 4},
                     "train": {"batch_size": 64}},
            "blocks": {"depth": 3, "channels": 32},
            "params": {"optim.weight_decay": {"choices": [1e-4]}}}


def chaos(scale: Scale, root: Path) -> list[dict[str, Any]]:
    rows = []
    total = scale.chaos_trials * scale.chaos_epochs
    marks = [total * k // 4 for k in (1, 2, 3)]
    for arm, extra in (("checkpoints", []), ("--checkpoint-every 0", ["--checkpoint-every", "0"])):
        workdir = fresh(root, f"chaos-{len(rows)}")
        (workdir / "chaos.yaml").write_text(yaml.safe_dump(chaos_space(scale), sort_keys=False))
        flags = run_flags(scale, "chaos.yaml", scale.chaos_trials, scale.chaos_epochs, "--no-baseline", *extra)
        started = time.perf_counter()
        # two workers on the cores: one thread each, as run --workers 2 gives them
        threads = max(1, (os.cpu_count() or 2) // 2)
        slots = [start(workdir, flags, "w0", threads), start(workdir, flags, "w1", threads)]
        kills, n, seen, ticks, due = 0, 2, 0, [], None
        while any(p.poll() is None for p in slots):
            now, count = time.perf_counter(), trained(workdir)[0]
            if count > seen:
                seen, ticks = count, ticks + [now]
            if due is None and kills < len(marks) and count >= marks[kills]:
                # A preemption lands anywhere in an epoch, not just after a report: half an epoch
                # later (two workers report in turn, so one worker's epoch is about two gaps).
                gaps = [b - a for a, b in zip(ticks, ticks[1:])]
                due = now + (statistics.median(gaps) if gaps else 0.0)
            if due is not None and now >= due:
                victim = kills % 2
                kill(slots[victim])
                slots[victim] = start(workdir, flags, f"w{n}", threads)  # the scheduler restarts it
                kills, n, due = kills + 1, n + 1, None
            time.sleep(0.2)
        wall = time.perf_counter() - started
        epochs, trials = trained(workdir)
        done = sum(1 for _, state, _, _ in trials if state == "COMPLETE")
        rows.append({"arm": arm, "epochs": epochs, "wall": wall, "kills": kills, "complete": done,
                     "hit": sum(1 for _, state, _, _ in trials if state == "FAIL"),
                     "retries": sum(1 for _, _, _, taken in trials if taken), "trials": trials})
        print(f"  chaos {rows[-1]}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- disk


def disk(samples: int = 400) -> dict[str, float]:
    """Best-epoch weight files of the default space's models (MB): the baseline, and the median,
    90th percentile and largest of ``samples`` random configs (sizes from engine.models.model_cost
    on the meta device: no training). A trial's training state is about 3x its weights with Adam
    (weights and two moments), 4x while its best epoch is not its last (those weights too)."""
    import optuna

    from catdog_hpo.engine.models import model_cost
    from catdog_hpo.errors import ConfigError
    from catdog_hpo.search.space_files import load_space
    from catdog_hpo.search.spaces import resolve

    space = load_space("seed-cnn")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sizes = []
    for _ in range(samples):
        trial = study.ask()
        try:
            cfg = resolve(space, trial, {})
            sizes.append(model_cost(cfg.model, 2, cfg.image_size).params * 4 / 2**20)
        except ConfigError:  # a config the space allows but no model fits: turned away by run
            pass
        study.tell(trial, 0.0)
    base = resolve(space, optuna.trial.FixedTrial(dict(space.baseline)), {})
    sizes.sort()
    return {"baseline": model_cost(base.model, 2, base.image_size).params * 4 / 2**20,
            "median": statistics.median(sizes), "p90": sizes[int(0.9 * (len(sizes) - 1))], "max": sizes[-1],
            "n": len(sizes)}


# --------------------------------------------------------------------------- tables


def tables(scale: Scale, over: list[dict], lost: list[dict], mess: list[dict], mb: dict[str, float] | None) -> str:
    out = [] if mb is None else [f"| seed-cnn weights, MB ({mb['n']} random configs at 64 px) | baseline | median | 90th pct | largest |",
           "|---|---|---|---|---|",
           f"| one best-epoch weight file | {mb['baseline']:.1f} | {mb['median']:.1f} | {mb['p90']:.1f} | {mb['max']:.1f} |",
           f"| a 100-trial study leaves (--keep-weights 3) | {3 * mb['baseline']:.0f} | {3 * mb['median']:.0f} "
           f"| {3 * mb['p90']:.0f} | {3 * mb['max']:.0f} |",
           f"| plus, while it runs, per worker (two states, Adam: up to 4x each) | {8 * mb['baseline']:.0f} "
           f"| {8 * mb['median']:.0f} | {8 * mb['p90']:.0f} | {8 * mb['max']:.0f} |", ""]
    if over:
        out += ["| model (CPU) | train images | s/epoch without | s/epoch with | save s | share of an epoch | file MB |",
                "|---|---|---|---|---|---|---|"]
    for r in over:
        out.append(f"| {r['model']} | {r['images']} | {r['without']:.2f} | {r['with']:.2f} | {r['save']:.3f} "
                   f"| {100 * r['share']:.2f}% | {r['mb']:.1f} |")
    if lost:
        out += ["", f"| one {scale.lost_epochs}-epoch trial | epochs trained | wall s | vs uninterrupted |", "|---|---|---|---|"]
    for r in lost:
        out.append(f"| {r['arm']} | {r['epochs']} | {r['wall']:.0f} | {r['wall'] / lost[0]['wall']:.2f}x |")
    out += [] if not mess else ["", f"| chaos: 2 workers, {scale.chaos_trials} trials x {scale.chaos_epochs} epochs, 3 SIGKILLs "
                f"| epochs trained | wall s | completed | trials killed mid-training | resumed retries |",
            "|---|---|---|---|---|---|"]
    for r in mess:
        out.append(f"| {r['arm']} | {r['epochs']} (of {scale.chaos_trials * scale.chaos_epochs} needed) "
                   f"| {r['wall']:.0f} | {r['complete']} | {r['hit']} | {r['retries']} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="synthetic images, small sizes (a few minutes)")
    p.add_argument("--out", type=Path, default=None, help="working folder (default: a temp folder)")
    p.add_argument("--only", default="disk,overhead,lost,chaos", metavar="LIST",
                   help="the measurements to run (default: disk,overhead,lost,chaos)")
    args = p.parse_args()
    parts = set(args.only.split(","))
    scale = QUICK if args.quick else FULL
    if scale is FULL and not KAGGLE.is_dir():
        print(f"skipped: no data at {KAGGLE} (run --quick for synthetic images)")
        return 0
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    mb = disk() if "disk" in parts else None
    over = overhead(scale, root) if "overhead" in parts else []
    lost = lost_work(scale, root) if "lost" in parts else []
    mess = chaos(scale, root) if "chaos" in parts else []
    print(f"\n{'--quick: ' if args.quick else ''}{os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print(tables(scale, over, lost, mess, mb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
