"""MLflow tracking (issue 26, item 1) against a real `mlflow server` on 127.0.0.1.

The server (SQLite backend store, artifacts in a temp folder, a free port) starts when the module
does and is killed at its end; the tests that need no server run while it boots. Runs are read
back through ``mlflow.MlflowClient``: a study is a parent run with a child run per trial (params,
config.json, per-epoch metrics with the epoch as step, the state tag, predicted/measured
seconds), the workers of a resumed study log into the same parent, retrain logs its files; a dead
URI is one warning and the study completes; a missing mlflow is a one-line error naming the extra.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import yaml

mlflow = pytest.importorskip("mlflow")

from catdog_hpo.cli import main  # noqa: E402
from helpers import write_image_folder  # noqa: E402

EXPERIMENT = "catdog-hpo-tests"
STUDY = "tracked"
# Two epochs (SHA's rung at epoch 1 can prune), 32 training images of 16 px: a trial is a second.
SPACE = {
    "name": "mlflow-tiny",
    "base": {"image_size": 16, "model": {"family": "cnn", "head": "gap", "dropout": 0.0},
             "optim": {"name": "adam", "scheduler": "none"}, "train": {"epochs": 2, "batch_size": 8}},
    "blocks": {"depth": {"int": [1, 2]}, "channels": {"choices": [8, 16]}},
    "params": {"optim.name": {"choices": ["adam", "sgd"]}, "optim.lr": {"float": [1.0e-6, 1.0e9], "log": True}},
}
# One trial per state, in this order; a config asked for by name is never pruned, so the pruned
# trial is the sampler's first to finish after these (--trials 2 counts it and the complete one).
ENQUEUE = [
    {"depth": 2, "block0.channels": 16, "block1.channels": 16, "optim.name": "adam", "optim.lr": 0.01},  # rejected: > --max-params
    {"depth": 1, "block0.channels": 8, "optim.name": "sgd", "optim.lr": 1.0e9},  # failed: non-finite loss
    {"depth": 1, "block0.channels": 8, "optim.name": "adam", "optim.lr": 0.01},  # complete (val acc 1.0)
]
STATES = ["rejected", "failed", "complete"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """``mlflow server`` started (not yet answering): the process, its URI and its log."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own group: its uvicorn worker too
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _boot(server: tuple) -> None:
    """Starts the server before the first test, so it boots while the others run."""


@pytest.fixture(scope="module")
def uri(server: tuple) -> str:
    """The server's URI once it answers /health."""
    proc, address, log = server
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, f"mlflow server exited: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2) as r:
                if r.status == 200:
                    return address
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow server did not answer in 180 s: {log.read_text()[-2000:]}")


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(SPACE))
    (tmp_path / "enqueue.yaml").write_text(yaml.safe_dump(ENQUEUE))
    write_image_folder(tmp_path / "imgs", n_per_class=16, size=16)
    return tmp_path


def run_args(study: str, trials: int, *extra: str) -> list[str]:
    return ["run", "--space", "tiny.yaml", "--data", "imgs", "--study", study, "--trials", str(trials),
            "--sampler", "random", "--pruner", "sha", "--device", "cpu", "--no-progress", "--no-baseline",
            "--storage", "sqlite:///studies/t.db", *extra]


def mlflow_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("mlflow:")]


# --------------------------------------------------------------------------- no server needed


def test_a_missing_mlflow_is_a_one_line_error_naming_the_extra(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    assert main(run_args("missing", 1, "--mlflow", "http://127.0.0.1:9")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "pip install 'catdog-hpo[mlflow]'" in err and "--mlflow" in err, err
    # $MLFLOW_TRACKING_URI alone turns tracking on: the same error, and how to turn it off.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert main(run_args("missing", 1)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "catdog-hpo[mlflow]" in err and "--no-mlflow" in err, err
    assert main(["retrain", "--config", "nothing.yaml", "--mlflow", "http://127.0.0.1:9"]) == 2
    assert "catdog-hpo[mlflow]" in capsys.readouterr().err
    assert not (workdir / "studies").exists()  # refused before any study or data


def test_the_uri_and_the_state_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from optuna.trial import TrialState

    from catdog_hpo.errors import UserError
    from catdog_hpo.search.tracking import state_of, tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking_uri(None) == "http://127.0.0.1:9" and tracking_uri("file:///x") == "file:///x"
    assert tracking_uri(None, off=True) is None  # --no-mlflow wins over the variable
    with pytest.raises(UserError, match="give one of them"):
        tracking_uri("file:///x", off=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert tracking_uri(None) is None

    def trial(state: TrialState, **attrs: object) -> optuna.trial.FrozenTrial:
        value = 0.9 if state == TrialState.COMPLETE else None
        return optuna.trial.create_trial(state=state, value=value, user_attrs=attrs)

    assert state_of(trial(TrialState.COMPLETE)) == "complete"
    assert state_of(trial(TrialState.PRUNED)) == "pruned"
    assert state_of(trial(TrialState.PRUNED, rejected="> --max-params")) == "rejected"
    assert state_of(trial(TrialState.FAIL)) == "failed"
    assert state_of(trial(TrialState.COMPLETE, stopped_early=2)) == "pruned"  # multi-objective, stopped early


def test_a_dead_server_is_one_warning_and_the_study_completes(workdir: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(run_args("dead", 2, "--enqueue", "enqueue.yaml", "--max-params", "1000", "--mlflow", dead)) == 0
    said = mlflow_warnings(caught)
    assert len(said) == 1, said
    assert dead in said[0] and "logs nothing more to MLflow" in said[0]
    import optuna

    study = optuna.load_study(study_name="dead", storage="sqlite:///studies/t.db")
    assert sum(t.state.name in ("COMPLETE", "PRUNED") and "rejected" not in t.user_attrs for t in study.trials) == 2


# --------------------------------------------------------------------------- against the server


def test_a_study_is_a_parent_run_with_a_child_run_per_trial(workdir: Path, uri: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    # No flag: $MLFLOW_TRACKING_URI turns tracking on, as it does for MLflow's own clients.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(run_args(STUDY, 2, "--enqueue", "enqueue.yaml", "--max-params", "1000")) == 0
    assert not mlflow_warnings(caught)
    study = optuna.load_study(study_name=STUDY, storage="sqlite:///studies/t.db")
    parent_id = study.user_attrs["mlflow_run_id"]

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.run_name == STUDY and parent.info.status == "FINISHED"
    assert parent.data.params["space"].endswith("tiny.yaml")
    assert {"sampler": "random", "pruner": "sha"}.items() <= parent.data.params.items()
    assert "imgs" in parent.data.params["data"]
    assert parent.data.metrics["best_val_acc"] == 1.0

    children = trial_runs(client, parent)
    last = len(study.trials) - 1  # the sampler's pruned trial; any before it failed (lr 1e-6..1e9)
    assert sorted(children) == list(range(last + 1)) and last >= 3
    states = [children[n].data.tags["state"] for n in range(last + 1)]
    assert states == [*STATES, *["failed"] * (last - 3), "pruned"]
    assert [children[n].info.status for n in (0, 1, 2, last)] == ["FINISHED", "FAILED", "FINISHED", "FINISHED"]
    for number, run in children.items():
        trial = study.trials[number]
        assert run.data.params == {k: str(v) for k, v in trial.params.items()}
        assert run.data.tags["mlflow.parentRunId"] == parent_id
    complete, pruned = children[2], children[last]
    # per-epoch metrics with the epoch as step: both epochs of the complete trial, one of the pruned
    for name in ("train_loss", "val_loss", "val_acc", "lr", "epoch_s"):
        assert [m.step for m in client.get_metric_history(complete.info.run_id, name)] == [1, 2], name
    history = study.trials[2].user_attrs["history"]
    assert [m.value for m in client.get_metric_history(complete.info.run_id, "val_acc")] == \
        [h["val_acc"] for h in history]
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "val_acc")] == [1]
    assert complete.data.metrics["best_val_acc"] == study.trials[2].value
    for run, trial in ((complete, study.trials[2]), (pruned, study.trials[last])):
        assert run.data.metrics["predicted_s"] == pytest.approx(trial.user_attrs["predicted_s"])
        assert run.data.metrics["measured_s"] == pytest.approx(trial.user_attrs["measured_s"])
    assert "max-params" in children[0].data.tags["reason"] and "non-finite" in children[1].data.tags["reason"]
    config = mlflow.artifacts.load_dict(f"{complete.info.artifact_uri}/config.json")
    assert config == study.trials[2].user_attrs["config"]


def test_workers_of_a_resumed_study_log_into_the_same_parent_run(workdir: Path, uri: str) -> None:
    import optuna

    assert main(run_args("shared", 1, "--mlflow", uri)) == 0
    assert main(run_args("shared", 3, "--mlflow", uri, "--workers", "2")) == 0  # two worker processes
    study = optuna.load_study(study_name="shared", storage="sqlite:///studies/t.db")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([experiment], filter_string="attributes.run_name = 'shared'")
    assert [p.info.run_id for p in parents] == [study.user_attrs["mlflow_run_id"]]
    children = trial_runs(client, parents[0])
    assert sorted(children) == [t.number for t in study.trials]
    assert all(c.data.tags["state"] in ("complete", "pruned", "failed") for c in children.values())


def test_a_dead_workers_trial_run_ends_failed_when_another_worker_fails_the_trial_as_stale(workdir: Path,
                                                                                           uri: str) -> None:
    """A worker killed mid-trial (SIGKILL: none of its own code runs) leaves its trial RUNNING and
    its child run RUNNING; the worker that fails the trial as stale at its next claim (Optuna's
    fail_stale_trials) ends that run FAILED."""
    import optuna

    from catdog_hpo.search import optuna_compat
    from catdog_hpo.search.study import open_run_storage
    from catdog_hpo.search.tracking import TrialRuns

    args = run_args("stale", 1, "--mlflow", uri, "--heartbeat", "1")  # stale after 3 s without a beat
    assert main(args) == 0  # the study and its parent run, one trial done
    # The dead worker, as a worker claims: a trial, one heartbeat, its child run; then nothing.
    storage = open_run_storage("sqlite:///studies/t.db", heartbeat=1)
    study = optuna.load_study(study_name="stale", storage=storage)
    trial = study.ask()
    optuna_compat.record_heartbeat(storage, trial)
    TrialRuns(uri, study).started(trial)
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(study.user_attrs["mlflow_run_id"])
    assert trial_runs(client, parent)[trial.number].info.status == "RUNNING"
    time.sleep(4.5)  # past the 3 s grace period (the database clock counts whole seconds)

    assert main(args) == 0  # another worker: its claim fails the silent trial (its N is already done)
    study = optuna.load_study(study_name="stale", storage="sqlite:///studies/t.db")
    assert study.trials[trial.number].state.name == "FAIL"
    dead = trial_runs(client, parent)[trial.number]
    assert dead.info.status == "FAILED" and dead.data.tags["state"] == "failed", (dead.info, dead.data.tags)
    assert "failed as stale" in dead.data.tags["reason"]
    assert all(r.info.status != "RUNNING" for r in trial_runs(client, parent).values())


def test_retrain_logs_the_model_files_metrics_and_card(workdir: Path, uri: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(run_args("shipped", 1)) == 0
    assert main(["export", "--study", "shipped", "--storage", "sqlite:///studies/t.db"]) == 0
    export = next((workdir / "studies" / "exports").glob("shipped-trial*.yaml"))
    capsys.readouterr()
    assert main(["retrain", "--config", str(export), "--epochs", "1", "--no-export", "--no-progress",
                 "--device", "cpu", "--mlflow", uri]) == 0
    assert "mlflow:" in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    [run] = client.search_runs([experiment], filter_string=f"attributes.run_name = 'retrain-{export.stem}'")
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "metrics.json", "MODEL_CARD.md", "curves.svg"} <= files, files
    assert 0.0 <= run.data.metrics["kept_val_acc"] <= 1.0 and run.data.params["train_on"] == "train"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]


def trial_runs(client, parent) -> dict[int, object]:
    """The parent run's child runs by trial number."""
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {int(r.data.tags["optuna.trial_number"]): r for r in runs}
