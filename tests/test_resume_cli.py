"""No lost work, through the real command line: a trial stopped after epoch 5 of 8 (Ctrl-C,
SIGTERM, SIGKILL; one of two workers killed; a machine of a PostgreSQL study) resumes at epoch 6
and ends with the uninterrupted trial's history and value; a damaged checkpoint is ignored with
one warning line; the searched weights ship without retraining (export --with-weights ->
retrain --no-train -> predict).

Where the stop lands is made exact, not raced: a ``sitecustomize`` on the runs' PYTHONPATH
(every process, spawned workers too) pauses the process that saved trial T's state after epoch
E and writes its pid to a file; the test then sends the real signal to that pid. Or it sends
the signal itself, from inside trial T's report of epoch E to the pruner (before that epoch's
save: the stop must wait for the save).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from catdog_hpo.search.record import TrialKey
from helpers import Proc, TINY_SPACE
from test_postgres import Server, postgres  # noqa: F401  (the fixture: a fresh database; skips without a server)

# 8 epochs of a tiny CNN at 16 px on the 1,000 synthetic images: well under a second each.
EIGHT = {**TINY_SPACE, "name": "eight", "base": {**TINY_SPACE["base"], "train": {"epochs": 8, "batch_size": 64}},
         "blocks": {"depth": 1, "channels": 8}}
STUDY = "resume"
WAIT_S = 180
PAUSE_HOOK = '''
import os, sys, time
if os.environ.get("CATDOG_TEST_PAUSE"):
    trial, epoch, marker = os.environ["CATDOG_TEST_PAUSE"].split(":", 2)
    from catdog_hpo.engine import resume
    _save = resume.save

    def save(spec, loop, at, history, best, newest):
        ok = _save(spec, loop, at, history, best, newest)
        if at == int(epoch) and spec.path.name.startswith(f"trial-{trial}-"):
            with open(marker + ".tmp", "w") as fh:
                fh.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            # The save is part of the epoch's end, where search.interrupts holds a signal until
            # the end is done: wait (up to 120 s) until one arrives, then let the end finish.
            from catdog_hpo.search import interrupts
            deadline = time.time() + 120
            while interrupts._state["pending"] is None and time.time() < deadline:
                time.sleep(0.02)
        return ok

    resume.save = save
if os.environ.get("CATDOG_TEST_SIGNAL"):
    trial_n, epoch_n, signum = (int(x) for x in os.environ["CATDOG_TEST_SIGNAL"].split(":"))
    import signal
    import optuna
    _report = optuna.trial.Trial.report

    def report(self, value, step):
        _report(self, value, step)
        if self.number == trial_n and step == epoch_n:
            signal.raise_signal(signum)  # the handler runs now, in the report's store writes

    optuna.trial.Trial.report = report
'''


_STARTED: list[subprocess.Popen] = []


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "eight.yaml").write_text(yaml.safe_dump(EIGHT))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(PAUSE_HOOK)
    yield tmp_path
    while _STARTED:
        popen = _STARTED.pop()
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


def run_args(*extra: str, trials: int = 1) -> list[str]:
    return ["run", "--space", "eight.yaml", "--dataset", "synthetic", "--sampler", "random", "--pruner", "none",
            "--trials", str(trials), "--study", STUDY, "--device", "cpu", "--no-progress", "--heartbeat", "1", *extra]


def start(cwd: Path, args: list[str], tag: str, pause: tuple[int, int] | None = None,
          signal_in_report: tuple[int, int, signal.Signals] | None = None) -> Proc:
    """``pause=(T, E)``: pause after trial T's save of epoch E (``wait_paused``).
    ``signal_in_report=(T, E, sig)``: the run sends itself ``sig`` while trial T reports epoch E."""
    env = dict(os.environ)
    if pause is not None or signal_in_report is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(cwd / "hook"), env.get("PYTHONPATH", "")])
    if pause is not None:
        env["CATDOG_TEST_PAUSE"] = f"{pause[0]}:{pause[1]}:{cwd / 'paused.pid'}"
    if signal_in_report is not None:
        trial, epoch, sig = signal_in_report
        env["CATDOG_TEST_SIGNAL"] = f"{trial}:{epoch}:{int(sig)}"
    out, err = cwd / f"{tag}.out", cwd / f"{tag}.err"
    with open(out, "w") as o, open(err, "w") as e:
        popen = subprocess.Popen([sys.executable, "-m", "catdog_hpo", *args], cwd=cwd, stdout=o, stderr=e,
                                 env=env, start_new_session=True)
    _STARTED.append(popen)
    return Proc(popen, out, err, WAIT_S)


def wait_paused(cwd: Path, proc: Proc) -> int:
    """The pid of the process paused after its save (the run itself, or one of its workers)."""
    marker = cwd / "paused.pid"
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        if marker.exists():
            return int(marker.read_text())
        if proc.popen.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.popen.returncode}) before the pause:\n{proc.err.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"no pause after {WAIT_S} s")


def load(cwd: Path, storage: str | None = None) -> optuna.Study:
    from catdog_hpo.search.storage import open_storage

    return optuna.load_study(study_name=STUDY, storage=open_storage(storage or f"sqlite:///{cwd}/studies/catdog.db"))


def folder(root: Path) -> Path:
    return root / "checkpoints" / "catdog_db" / STUDY  # beside studies/catdog.db


def saved(path: Path) -> dict:
    """The newest state of a trial's checkpoint: ``path`` or its twin (engine.resume.state_paths)."""
    from catdog_hpo.engine.resume import state_paths

    states = [torch.load(p, map_location="cpu", weights_only=True) for p in state_paths(path) if p.exists()]
    return max(states, key=lambda s: s["epoch"])


def timeless(history: list[dict]) -> list[dict]:
    return [{**h, "seconds": 0.0} for h in history]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> optuna.trial.FrozenTrial:
    """The same trial (same seed: the same sampled parameters), never interrupted."""
    cwd = tmp_path_factory.mktemp("reference")
    (cwd / "eight.yaml").write_text(yaml.safe_dump(EIGHT))
    code, out, err = start(cwd, run_args(), "ref").finish()
    assert code == 0, err
    (trial,) = load(cwd).trials
    assert trial.state == TrialState.COMPLETE and len(trial.user_attrs[TrialKey.HISTORY]) == 8
    return trial


def assert_resumed(retry: optuna.trial.FrozenTrial, reference: optuna.trial.FrozenTrial, source: int,
                   taken_over: list[dict]) -> None:
    assert retry.state == TrialState.COMPLETE and retry.params == reference.params
    assert retry.user_attrs[TrialKey.RESUMED_FROM_TRIAL] == source
    assert retry.user_attrs[TrialKey.RESUMED_FROM_EPOCH] == 5
    history = retry.user_attrs[TrialKey.HISTORY]
    assert history[:5] == taken_over  # epochs 1-5 taken over, wall seconds and all: not trained again
    assert timeless(history) == timeless(reference.user_attrs[TrialKey.HISTORY])  # bit for bit
    assert retry.value == reference.value
    assert retry.intermediate_values == reference.intermediate_values  # the pruner saw the same epochs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["sigint", "sigterm", "sigkill"])
def test_a_stopped_trial_resumes_at_the_next_epoch(workdir: Path, reference: optuna.trial.FrozenTrial,
                                                   sig: signal.Signals) -> None:
    proc = start(workdir, run_args(), "a", pause=(0, 5))
    os.kill(wait_paused(workdir, proc), sig)
    code, _, err = proc.finish()
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), err
    first, *queued = load(workdir).trials  # Ctrl-C, SIGTERM: failed, its parameters queued again
    assert first.state == (TrialState.RUNNING if sig == signal.SIGKILL else TrialState.FAIL)
    assert [t.state for t in queued] == ([] if sig == signal.SIGKILL else [TrialState.WAITING])
    state = saved(folder(workdir / "studies") / first.user_attrs[TrialKey.CHECKPOINT])
    assert state["epoch"] == 5

    code, out, err = start(workdir, run_args(), "b").finish()
    assert code == 0, err
    assert "warning" not in err
    study = load(workdir)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert_resumed(study.trials[1], reference, 0, state["history"])
    assert "resumed trial 0 after epoch 5" in out
    # Housekeeping: the finished trial's state is gone; its best-epoch weights stay (top 3).
    left = sorted(p.name for p in folder(workdir / "studies").iterdir())
    assert left == [study.trials[1].user_attrs[TrialKey.WEIGHTS_FILE]] and left[0].startswith("best-1-")


def test_a_signal_during_an_epochs_report_waits_for_its_checkpoint(workdir: Path,
                                                                  reference: optuna.trial.FrozenTrial) -> None:
    # Ctrl-C while epoch 5 is reported (search.interrupts holds it over the store writes): it
    # stops the trial only after epoch 5 is saved, so no epoch is lost and the retry does not
    # warn "checkpoint ignored". (It once stopped the trial right after the report: epoch 4.)
    proc = start(workdir, run_args(), "a", signal_in_report=(0, 5, signal.SIGINT))
    code, _, err = proc.finish()
    assert code == 130, err
    first, queued = load(workdir).trials
    assert first.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert sorted(first.intermediate_values) == [1, 2, 3, 4, 5]  # stopped in epoch 5's end, not in 6
    state = saved(folder(workdir / "studies") / first.user_attrs[TrialKey.CHECKPOINT])
    assert state["epoch"] == 5

    code, out, err = start(workdir, run_args(), "b").finish()
    assert code == 0, err
    assert "warning" not in err
    assert_resumed(load(workdir).trials[1], reference, 0, state["history"])
    assert "resumed trial 0 after epoch 5" in out


def test_a_damaged_checkpoint_is_ignored_with_one_warning(workdir: Path, reference: optuna.trial.FrozenTrial) -> None:
    proc = start(workdir, run_args(), "a", pause=(0, 5))
    os.kill(wait_paused(workdir, proc), signal.SIGINT)
    assert proc.finish()[0] == 130
    path = folder(workdir / "studies") / load(workdir).trials[0].user_attrs[TrialKey.CHECKPOINT]
    twins = sorted(folder(workdir / "studies").glob("trial-0-*.pt"))
    assert len(twins) == 2  # saves alternate between two files
    for twin in twins:
        twin.write_bytes(twin.read_bytes()[:1000])  # cut short

    code, out, err = start(workdir, run_args(), "b").finish()
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "Traceback" not in err
    assert warnings[0].startswith("warning: trial 1 retries trial 0: checkpoint ignored (")
    assert "damaged" in warnings[0] and warnings[0].endswith("training from epoch 1")
    retry = load(workdir).trials[1]
    assert retry.user_attrs[TrialKey.RESUMED_FROM_EPOCH] == 0 and "damaged" in retry.user_attrs[TrialKey.RESUME_IGNORED]
    # trained again from epoch 1, with the same seed: the same history
    assert timeless(retry.user_attrs[TrialKey.HISTORY]) == timeless(reference.user_attrs[TrialKey.HISTORY])
    assert not path.exists() and not any(t.exists() for t in twins)  # tidied with its trial


def test_one_of_two_workers_killed_the_other_resumes_its_trial(workdir: Path) -> None:
    proc = start(workdir, run_args("--workers", "2", trials=2), "a", pause=(1, 5))
    worker = wait_paused(workdir, proc)
    assert worker != proc.popen.pid
    (state_file,) = [p for p in folder(workdir / "studies").glob("trial-1-*.pt") if not p.name.endswith(".b.pt")]
    taken_over = saved(state_file)["history"]
    os.kill(worker, signal.SIGKILL)
    code, out, err = proc.finish()
    assert code == 2 and "1 of 2 workers exited with an error" in err  # the killed one
    study = load(workdir)
    by_state = {t.number: t.state for t in study.trials}
    assert by_state == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.COMPLETE}, by_state
    retry = study.trials[2]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 1
    assert retry.params == study.trials[1].params
    assert retry.user_attrs[TrialKey.RESUMED_FROM_TRIAL] == 1 and retry.user_attrs[TrialKey.RESUMED_FROM_EPOCH] == 5
    assert retry.user_attrs[TrialKey.HISTORY][:5] == taken_over and len(retry.user_attrs[TrialKey.HISTORY]) == 8
    assert not list(folder(workdir / "studies").glob("trial-*.pt"))


@pytest.mark.postgres
def test_a_machine_of_a_postgres_study_dies_another_resumes_from_the_shared_dir(
        tmp_path: Path, reference: optuna.trial.FrozenTrial, postgres: Server) -> None:  # noqa: F811
    url = postgres.new_database()
    shared = tmp_path / "shared-checkpoints"
    machines = []
    for name in ("one", "two"):
        home = tmp_path / name
        (home / "hook").mkdir(parents=True)
        (home / "eight.yaml").write_text(yaml.safe_dump(EIGHT))
        (home / "hook" / "sitecustomize.py").write_text(PAUSE_HOOK)
        machines.append(home)
    args = run_args("--storage", url, "--checkpoint-dir", str(shared))
    proc = start(machines[0], args, "a", pause=(0, 5))
    os.kill(wait_paused(machines[0], proc), signal.SIGKILL)  # the machine is lost
    proc.finish()
    (state_file,) = [p for p in shared.glob("postgresql-*/resume/trial-0-*.pt") if not p.name.endswith(".b.pt")]
    taken_over = saved(state_file)["history"]
    code, out, err = start(machines[1], args, "b").finish()
    assert code == 0, err
    assert "checkpoints: kept on this machine" not in out
    study = load(machines[1], url)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert_resumed(study.trials[1], reference, 0, taken_over)
    assert not list(shared.glob("*/resume/trial-*.pt"))


def test_searched_weights_ship_without_retraining(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A 2-trial study of 3 epochs in-process, then export -> retrain --no-train -> predict."""
    from PIL import Image

    from catdog_hpo.cli import main
    from catdog_hpo.data.builtin import synthetic_images

    cwd = workdir
    monkeypatch.chdir(cwd)
    assert main(run_args("--epochs", "3", trials=2)) == 0
    study = load(cwd)
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    assert all(t.user_attrs.get(TrialKey.WEIGHTS_FILE) for t in study.trials)  # both in the top 3
    assert main(["export", "--study", STUDY, "--with-weights", "--out", "best.yaml"]) == 0
    doc = yaml.safe_load((cwd / "best.yaml").read_text())
    assert doc["weights"]["file"] == "best.weights.pt" and doc["weights"]["val_acc"] == best.value
    assert doc["weights"]["epoch"] == best.user_attrs[TrialKey.BEST_EPOCH]
    started = time.perf_counter()
    assert main(["retrain", "--config", "best.yaml", "--no-train", "--out", "model", "--device", "cpu",
                 "--no-progress"]) == 0
    seconds = time.perf_counter() - started
    metrics = json.loads((cwd / "model" / "metrics.json").read_text())
    # the model the search measured: the same correct count (its value was a float32 ratio)
    assert metrics["val"]["accuracy"] == pytest.approx(best.value, abs=1e-7)
    assert metrics["searched_weights"]["trial"] == best.number
    assert all(metrics["exports"][f]["ok"] for f in ("torchscript", "onnx", "pt2"))
    card = (cwd / "model" / "MODEL_CARD.md").read_text()
    assert f"- Weights: the search's own, not retrained: trial {best.number}'s best epoch" in card
    assert "--no-train" in card
    x, _ = synthetic_images(4, 16, seed=7)
    for i in range(4):
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(cwd / f"img{i}.png")
    capsys.readouterr()
    assert main(["predict", "--model", "model/model.pt", *(f"img{i}.png" for i in range(4)), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and all(r["class"] in metrics["data"]["classes"] for r in rows)
    assert seconds < 60  # no training: evaluation, four files and the card
    assert main(["retrain", "--config", "best.yaml", "--no-train", "--epochs", "2"]) == 2
    assert "drop --epochs" in capsys.readouterr().err


# --------------------------------------------------------------------------- where, and what is kept (no training)


def test_the_checkpoint_folder_of_each_store(tmp_path: Path) -> None:
    from catdog_hpo.search.checkpoints import study_folder

    studies = Path("studies")
    assert study_folder("sqlite:///studies/catdog.db", "my study", studies, None) == (
        Path("studies/checkpoints/catdog_db/my_study"), True)
    assert study_folder("studies/catdog.log", "s", studies, None) == (Path("studies/checkpoints/catdog_log/s"), True)
    assert study_folder("sqlite:///:memory:", "s", studies, None) == (None, False)
    url = "postgresql://user:secret@db.example/catdog"
    assert study_folder(url, "s", studies, None) == (Path("studies/checkpoints/postgresql-catdog/s"), False)
    assert study_folder(url, "s", studies, tmp_path) == (tmp_path / "postgresql-catdog" / "s", True)
    from catdog_hpo.search.checkpoints import where

    assert "point --checkpoint-dir at storage every machine mounts" in where(url, "s", studies, None)
    assert where(url, "s", studies, tmp_path) is None and where("sqlite:///studies/catdog.db", "s", studies, None) is None


def test_tidy_keeps_what_an_unfinished_trial_or_a_pending_retry_needs_and_the_top_weights(tmp_path: Path) -> None:
    from optuna.distributions import FloatDistribution

    from catdog_hpo.search.checkpoints import Checkpoints

    study = optuna.create_study(direction="maximize")
    dist = {"x": FloatDistribution(0, 1)}

    def add(state: TrialState, value: float | None = None, retry_of: int | None = None, history: list | None = None,
            **files: str) -> None:
        attrs = {k: v for k, v in {TrialKey.CHECKPOINT: files.get("ck"), TrialKey.WEIGHTS_FILE: files.get("w"),
                                   TrialKey.RETRY_OF: retry_of}.items() if v is not None}
        system = {"failed_trial": history[0], "retry_history": history} if history else {}
        study.add_trial(optuna.trial.create_trial(state=state, value=value, params={"x": 0.5}, distributions=dist,
                                                  user_attrs=attrs, system_attrs=system))

    add(TrialState.COMPLETE, 0.9, ck="trial-0-a.pt", w="best-0-a.pt")  # 0: top 1
    add(TrialState.COMPLETE, 0.8, w="best-1-a.pt")  # 1: top 2
    add(TrialState.COMPLETE, 0.7, w="best-2-a.pt")  # 2: out of the top 2
    add(TrialState.FAIL, ck="trial-3-a.pt")  # 3: interrupted, its retry 4 waits
    add(TrialState.WAITING, retry_of=3)  # 4
    add(TrialState.FAIL, ck="trial-5-a.pt")  # 5: dead worker, its stale retry 6 waits
    add(TrialState.WAITING, history=[5], ck="trial-5-a.pt")  # 6 (Optuna copies the attributes)
    add(TrialState.FAIL, ck="trial-7-a.pt")  # 7: failed for good (no retry)
    add(TrialState.PRUNED, ck="trial-8-a.pt")  # 8
    folder = tmp_path / "ck"
    folder.mkdir()
    names = ["trial-0-a.pt", "best-0-a.pt", "best-1-a.pt", "best-2-a.pt", "trial-3-a.pt", "trial-5-a.pt",
             "trial-7-a.pt", "trial-8-a.pt", "trial-9-orphan.pt", "notes.txt", ".trial-3-a.pt.1.ab.tmp", ".fresh.tmp"]
    for name in names:
        (folder / name).write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(folder / ".trial-3-a.pt.1.ab.tmp", (old, old))  # a write a SIGKILL cut short, long ago
    removed = Checkpoints(folder, keep=2).tidy(study)
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([".fresh.tmp", "best-0-a.pt", "best-1-a.pt", "notes.txt", "trial-3-a.pt", "trial-5-a.pt"])
    assert removed == len(names) - len(left)
