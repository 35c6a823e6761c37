"""Faults a long study meets, with real processes through the real command line.

A worker killed outright (SIGKILL: its trial is failed by the heartbeat and its parameters run
again), Ctrl-C and SIGTERM (the running trial is closed and re-queued; exit 130 and one line on
how to resume), several workers hammering one SQLite file, and GPUs handed out to workers.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from catdog_hpo.engine.device import assign_gpus, parse_gpus
from catdog_hpo.errors import UserError
from catdog_hpo.search.study import count
from concurrent_open import open_at_once
from helpers import Proc, TINY_SPACE, write_image_folder

TINY = TINY_SPACE
# Trials of about 5 seconds (an epoch of the 1,000 synthetic images takes about 0.05 s), so a
# signal sent as soon as the first epoch is reported lands in the middle of training, also when
# that report is a resumed trial's replay of its saved epochs (6 epochs once left the rerun 0.3 s
# of training: a signal sent a loaded moment later found the study finished).
SLOW = {**TINY, "name": "slow", "base": {**TINY["base"], "train": {"epochs": 100, "batch_size": 64}},
        "blocks": {"depth": 1, "channels": 8}}
STUDY = "faults"
DB = "studies/catdog.db"  # the CLI's default store, relative to the run's folder
WAIT_S = 120  # the most a test waits for a process or a trial state (start-up is seconds)


_STARTED: list[subprocess.Popen] = []  # every process a test started, ended at its teardown


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(SLOW))
    yield tmp_path
    while _STARTED:  # a failed test may leave a run (and its workers) going: end its group
        popen = _STARTED.pop()
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


def run_args(space: str, trials: int, *extra: str, data: tuple[str, str] = ("--dataset", "synthetic")) -> list[str]:
    return ["run", "--space", space, *data, "--sampler", "random", "--pruner", "none",
            "--trials", str(trials), "--study", STUDY, "--device", "cpu", "--no-progress", *extra]


def start(cwd: Path, args: list[str], tag: str, prefix: list[str] | None = None) -> Proc:
    """``python -m catdog_hpo ARGS`` in ``cwd``; output to files (a full pipe would block it)."""
    out, err = cwd / f"{tag}.out", cwd / f"{tag}.err"
    cmd = [sys.executable, *(prefix or ["-m", "catdog_hpo"]), *args]
    with open(out, "w") as o, open(err, "w") as e:
        # Its own process group, so teardown can end its workers too; signals go to its pid only.
        popen = subprocess.Popen(cmd, cwd=cwd, stdout=o, stderr=e, start_new_session=True)
    _STARTED.append(popen)
    return Proc(popen, out, err, WAIT_S)


def cli(cwd: Path, args: list[str], tag: str) -> tuple[int, str, str]:
    return start(cwd, args, tag).finish()


def training_now(cwd: Path) -> list[int]:
    """Numbers of the RUNNING trials that have reported at least one epoch, read straight from
    the SQLite file (WAL: reading never blocks the run)."""
    if not (cwd / DB).exists():
        return []
    con = sqlite3.connect(cwd / DB, timeout=30)
    try:
        rows = con.execute(
            "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = ? AND t.state = 'RUNNING' AND EXISTS "
            "(SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)", (STUDY,)).fetchall()
    except sqlite3.OperationalError:  # the tables are not created yet
        return []
    finally:
        con.close()
    return sorted(r[0] for r in rows)


def wait_training(cwd: Path, proc: Proc, n: int = 1) -> list[int]:
    """Block until ``n`` trials are mid-training; fail if the process ends first."""
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        running = training_now(cwd)
        if len(running) >= n:
            return running
        if proc.popen.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.popen.returncode}) before {n} trials trained:\n"
                        f"{proc.err.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"no {n} trials were training after {WAIT_S} s")


def queued(study: optuna.Study) -> list[dict]:
    """The parameters of the WAITING trials (enqueue_trial keeps them in a system attribute
    until a worker picks the trial up)."""
    return [t.system_attrs["fixed_params"] for t in study.get_trials(states=(TrialState.WAITING,))]


def load(cwd: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{cwd / DB}")


def assert_interrupted(code: int, out: str, err: str) -> None:
    assert code == 130, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"stderr should be one line:\n{err}"
    assert lines[0].startswith("interrupted at ") and "Resume with the same command" in lines[0]


# --------------------------------------------------------------------------- signals


def test_sigint_then_sigterm_close_the_trial_and_rerun_reaches_n(workdir: Path) -> None:
    args = run_args("slow.yaml", 1)

    # Ctrl-C in the middle of trial 0.
    proc = start(workdir, args, "a")
    assert wait_training(workdir, proc) == [0]
    proc.popen.send_signal(signal.SIGINT)
    assert_interrupted(*proc.finish())
    study = load(workdir)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    first = study.trials[0]
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    assert queued(study) == [first.params]  # queued to run first on resume
    waiting = study.get_trials(states=(TrialState.WAITING,))

    # The rerun takes up those parameters; SIGTERM in the middle of it.
    proc = start(workdir, args, "b")
    assert wait_training(workdir, proc) == [waiting[0].number]
    proc.popen.send_signal(signal.SIGTERM)
    assert_interrupted(*proc.finish())
    study = load(workdir)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    second = study.trials[waiting[0].number]
    assert second.state == TrialState.FAIL and second.params == first.params
    assert second.user_attrs["fail_reason"] == "interrupted (SIGTERM)"

    # A third run finishes the study with those parameters: exactly 1 finished trial.
    code, out, err = cli(workdir, args, "c")
    assert code == 0, err
    study = load(workdir)
    assert count(study) == (1, 0, 0)
    assert [t.params for t in study.get_trials(states=(TrialState.COMPLETE,))] == [first.params]
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 2


def test_sigterm_to_parent_closes_every_workers_trial(workdir: Path) -> None:
    proc = start(workdir, run_args("slow.yaml", 6, "--workers", "2"), "w")
    training = wait_training(workdir, proc, n=2)
    proc.popen.send_signal(signal.SIGTERM)
    assert_interrupted(*proc.finish())
    study = load(workdir)
    assert not study.get_trials(states=(TrialState.RUNNING,)), "a worker left its trial RUNNING"
    # Each trial that was training either finished just before the signal reached its worker
    # (then the worker may have been between trials) or was closed as interrupted.
    assert all(study.trials[n].state in (TrialState.FAIL, TrialState.COMPLETE) for n in training)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert 1 <= len(failed) <= 2
    assert all(t.user_attrs["fail_reason"] == "interrupted (SIGTERM)" for t in failed)
    assert sorted(map(str, queued(study))) == sorted(str(t.params) for t in failed)


# --------------------------------------------------------------------------- a worker dies


def test_killed_worker_is_failed_by_heartbeat_and_its_params_retried(workdir: Path) -> None:
    args = run_args("slow.yaml", 1, "--heartbeat", "1")  # stale after 3 s of silence
    proc = start(workdir, args, "a")
    assert wait_training(workdir, proc) == [0]
    proc.popen.send_signal(signal.SIGKILL)  # no handler runs: trial 0 stays RUNNING
    proc.finish()
    assert [t.state for t in load(workdir).trials] == [TrialState.RUNNING]

    code, out, err = cli(workdir, args, "b")
    assert code == 0, err
    study = load(workdir)
    assert count(study) == (1, 0, 0)
    dead = study.trials[0]
    assert dead.state == TrialState.FAIL
    retries = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [0]
    assert "database is locked" not in err


# A `catdog-hpo run` that dies (SIGKILL) right after it claimed a trial, before that trial's
# heartbeat thread starts: the window where a preempted machine leaves a trial with no heartbeat.
_DIE_AFTER_CLAIM = """
import os, signal, sys
import optuna.storages._heartbeat as heartbeat

def die(trial_id, storage):
    os.kill(os.getpid(), signal.SIGKILL)

heartbeat.get_heartbeat_thread = die
from catdog_hpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_worker_killed_right_after_claiming_does_not_block_the_study(workdir: Path) -> None:
    """A trial claimed by a worker that died before its first heartbeat is never seen as stale
    by Optuna (no heartbeat row), so it stays RUNNING and holds its place in the budget: the
    rerun must still reach N (here it would wait until --timeout, with 0 finished)."""
    args = run_args("tiny.yaml", 1, "--heartbeat", "1")
    code, _, _ = start(workdir, args, "a", prefix=["-c", _DIE_AFTER_CLAIM]).finish()
    assert code == -signal.SIGKILL
    assert [t.state for t in load(workdir).trials] == [TrialState.RUNNING]

    code, out, err = cli(workdir, [*args, "--timeout", "12"], "b")
    study = load(workdir)
    assert count(study)[0] == 1, f"the orphaned trial blocked the study:\n{out}\n{err}"
    assert code == 0 and study.trials[0].state == TrialState.FAIL


# --------------------------------------------------------------------------- several machines


def test_machines_opening_an_empty_sqlite_store_at_once(tmp_path: Path) -> None:
    """Several `run`s started together on a new store file (say, on a shared disk) all get it,
    instead of racing to create Optuna's tables ("table studies already exists")."""
    outcomes = open_at_once(f"sqlite:///{tmp_path}/studies/new.db", 8, tmp_path / "sync")
    assert outcomes == ["ok"] * 8


def test_machines_started_together_sample_different_parameters(workdir: Path) -> None:
    """Each machine's `run` is its own worker 0 and finds the study with the same number of
    trials; their samplers must still draw different parameters, or they run the same trials."""
    from catdog_hpo.data import DataSource
    from catdog_hpo.search.space_files import load_space
    from catdog_hpo.search.spaces import resolve
    from catdog_hpo.search.settings import RunSettings
    from catdog_hpo.search.study import create_or_resume, open_run_storage

    settings = RunSettings(study=STUDY, storage=f"sqlite:///{workdir}/{DB}", space=str(workdir / "tiny.yaml"),
                           sampler="random", pruner="none", trials=10, data=DataSource(name="synthetic"))
    space = load_space(settings.space)
    storage = open_run_storage(settings.storage, heartbeat=10)
    studies = [create_or_resume(settings, storage, space, "data-fingerprint")[0] for _ in range(3)]
    params = []
    for study in studies:  # each machine asks for its first trial
        trial = study.ask()
        resolve(space, trial)
        params.append(tuple(sorted(trial.params.items())))
    assert len(set(params)) == 3, f"machines drew the same parameters: {params}"


# --------------------------------------------------------------------------- SQLite under load


def test_six_workers_on_one_sqlite_file(workdir: Path) -> None:
    """Short trials on a tiny image folder, so the workers spend their time in the store."""
    write_image_folder(workdir / "data", n_per_class=16, size=16, split=True, n_val_per_class=8)
    n = 30
    code, out, err = cli(workdir, run_args("tiny.yaml", n, "--workers", "6", data=("--data", "data")), "load")
    assert code == 0, err
    assert "database is locked" not in out + err and "Traceback" not in err
    study = load(workdir)
    assert count(study) == (n, 0, 0)
    assert not study.get_trials(states=(TrialState.FAIL,)), [t.user_attrs.get("fail_reason") for t in study.trials]
    assert len(study.trials) == n  # no trial lost, failed or claimed past the budget
    assert len({t.number for t in study.trials}) == n


# --------------------------------------------------------------------------- GPUs for workers


def test_gpus_round_robin_over_workers() -> None:
    assert assign_gpus(4, parse_gpus("0,1", 2)) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert assign_gpus(6, parse_gpus("2,0,1", 4)) == ["cuda:2", "cuda:0", "cuda:1"] * 2
    assert assign_gpus(3, parse_gpus("1", 2)) == ["cuda:1"] * 3  # several workers on one GPU
    assert assign_gpus(1, parse_gpus("0,1", 2)) == ["cuda:0"]
    assert parse_gpus(None, 3) == [0, 1, 2] and parse_gpus(" 0, 1 ", 2) == [0, 1]
    assert assign_gpus(2, parse_gpus(None, 0)) == ["cpu", "cpu"]  # no GPU visible


@pytest.mark.parametrize("text, visible, says", [
    ("0,a", 2, "'a' is not a GPU id"),
    ("-1", 2, "'-1' is not a GPU id"),
    ("", 2, "'' is not a GPU id"),
    ("0,,1", 2, "'' is not a GPU id"),
    ("2", 2, "GPU 2 does not exist (this machine has GPUs 0 to 1)"),
    ("0", 0, "GPU 0 does not exist (this machine has no GPUs)"),
    ("1,1", 2, "GPU 1 is listed twice"),
])
def test_bad_gpu_ids_are_one_line_errors(text: str, visible: int, says: str) -> None:
    with pytest.raises(UserError) as info:
        parse_gpus(text, visible)
    message = str(info.value)
    assert message.startswith(f"--gpus {text!r}: ") and says in message and "\n" not in message
