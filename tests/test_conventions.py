"""Issue 13: first-run defaults and Optuna's/PyTorch's conventions, through the real CLI.

OPTUNA_STORAGE, --study-name/--n-trials, --device cuda:N, --json, run --config, the gp/cmaes/qmc
samplers, a sampler change on resume, journal file storage (two processes on one file), studies
delete/copy, one-line warnings, the driver extras, help texts. The README path export -> retrain
-> predict (ONNX and pt2) is in test_ship_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from catdog_hpo.cli import build_parser, main
from catdog_hpo.search.record import StudyKey
from catdog_hpo.search.run import run
from catdog_hpo.search.study import count
from helpers import TINY_SPACE, one_line_error
from study_factory import run_settings as settings
from study_factory import make_study

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    return tmp_path


# --------------------------------------------------------------------------- first-run defaults


def test_onnx_is_a_main_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert {"onnx", "onnxruntime", "onnxscript", "scipy", "cmaes"} <= names
    assert not project["optional-dependencies"].get("export")  # kept empty for old install commands
    assert {"postgres", "mysql"} <= set(project["optional-dependencies"])
    for path in (REPO / "catdog_hpo").rglob("*.py"):
        assert "catdog-hpo[export]" not in path.read_text(), path


@pytest.mark.parametrize(("url", "extra", "modules"), [
    ("postgresql://user:pw1@127.0.0.1/db", "postgres", ("psycopg2", "psycopg")),
    ("mysql://user:pw1@127.0.0.1/db", "mysql", ("pymysql", "MySQLdb")),
])
def test_missing_driver_names_the_extra(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                        url: str, extra: str, modules: tuple[str, ...]) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # "not installed"
    assert main(["studies", "--storage", url]) == 2
    err = one_line_error(capsys)
    assert f"pip install 'catdog-hpo[{extra}]'" in err and "driver is not installed" in err
    assert "pw1" not in err


def test_warnings_print_as_one_clean_line() -> None:
    code = ("from catdog_hpo.errors import install_warning_format; install_warning_format(); "
            "from catdog_hpo.data.folder import warn_skipped; "
            "warn_skipped('photos', ['a.jpg', 'b.jpg'], 10)")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.stderr == ("warning: photos: skipped 2 of 10 files that could not be decoded: a.jpg, b.jpg\n")


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_device_help_says_what_runs_there_and_takes_cuda_n() -> None:
    helps = {name: p.format_help() for name, p in _subparsers().items()}
    assert "where to train" not in " ".join(helps["predict"].split())
    assert "ONNX always runs on the CPU" in " ".join(helps["predict"].split())
    for name in ("run", "train", "retrain", "predict"):
        assert "cuda:N" in helps[name], name
        assert build_parser().parse_args([name, "--device", "cuda:1", *_required(name)]).device == "cuda:1"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--device", "gpu0", "--config", "x.yaml"])


def _required(command: str) -> list[str]:
    return {"run": [], "train": ["--config", "x.yaml"], "retrain": ["--config", "x.yaml"],
            "predict": ["--model", "m.pt", "img.png"]}[command]


def test_every_flag_has_help() -> None:
    for name, p in _subparsers().items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 8, f"{name} {action.option_strings}"


# --------------------------------------------------------------------------- conventions


def test_optuna_storage_env_aliases_and_json(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{workdir}/elsewhere.db"
    make_study(url, "demo", n_complete=3, n_pruned=1, n_failed=1, n_rejected=0)
    monkeypatch.setenv("OPTUNA_STORAGE", url)
    assert main(["studies", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["storage"] == url and [s["name"] for s in doc["studies"]] == ["demo"]
    assert doc["studies"][0]["complete"] == 3 and doc["studies"][0]["fail"] == 1
    assert main(["show", "--study-name", "demo", "--json", "--top", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["study"] == "demo" and shown["states"]["COMPLETE"] == 3 and len(shown["best"]) == 2
    assert shown["best"][0]["value"] >= shown["best"][1]["value"]
    assert main(["show", "--study", "demo"]) == 0  # the table stays
    assert "hyperparameters" in capsys.readouterr().out
    assert not (workdir / "studies" / "catdog.db").exists()  # the env var, not the default, was used


def test_run_config_file_flags_override_and_export_records_it(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    (workdir / "run.yaml").write_text(yaml.safe_dump({
        "space": "tiny.yaml", "sampler": "random", "pruner": "none", "trials": 2, "no-progress": True,
        "study": "from-file", "storage": "sqlite:///studies/c.db"}))
    assert main(["run", "--config", "run.yaml", "--n-trials", "3"]) == 0
    study = optuna.load_study(study_name="from-file", storage="sqlite:///studies/c.db")
    assert count(study) == (3, 0, 0)  # --n-trials on the command line beat the file's 2
    recorded = study.user_attrs[StudyKey.RUN_CONFIG]
    assert recorded["path"] == "run.yaml" and recorded["values"]["trials"] == 2
    assert main(["export", "--study-name", "from-file", "--storage", "sqlite:///studies/c.db", "--out", "e.yaml"]) == 0
    doc = yaml.safe_load((workdir / "e.yaml").read_text())
    assert doc["run"]["config_file"] == recorded and doc["run"]["samplers_used"] == ["random"]
    capsys.readouterr()

    (workdir / "bad.yaml").write_text(yaml.safe_dump({"trials": 2, "trails": 3}))
    assert main(["run", "--config", "bad.yaml"]) == 2
    err = one_line_error(capsys)
    assert "bad.yaml: unknown key 'trails'" in err
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"sampler": "annealing"}))
    assert main(["run", "--config", "bad.yaml"]) == 2
    assert "bad.yaml: sampler: 'annealing' is not one of" in one_line_error(capsys)


@pytest.mark.parametrize(("sampler", "trials"), [("gp", 6), ("cmaes", 6), ("qmc", 2)])
def test_new_samplers_run_on_synthetic(workdir: Path, sampler: str, trials: int) -> None:
    # 6 trials: past the 5 random start-up trials, so GP and CMA-ES sample from their model once.
    s = settings(workdir, sampler=sampler, trials=trials, study=f"s-{sampler}", seed=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run(s) == 0
    study = optuna.load_study(study_name=s.study, storage=s.storage)
    assert count(study) == (trials, 0, 0)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == trials
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) > 1
    noisy = [str(w.message) for w in record if "independent" in str(w.message).lower()]
    assert not noisy, noisy  # the per-parameter fallback warnings are switched off


def test_sampler_change_on_resume_is_recorded_and_stated(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(settings(workdir, sampler="random", trials=2)) == 0
    capsys.readouterr()
    assert run(settings(workdir, sampler="tpe", trials=3)) == 0
    out = capsys.readouterr().out
    assert "the study has used random -> tpe" in out
    study = optuna.load_study(study_name="s", storage=settings(workdir).storage)
    assert study.user_attrs[StudyKey.SAMPLERS_USED] == ["random", "tpe"]
    assert study.user_attrs[StudyKey.SAMPLER] == "tpe" and count(study) == (3, 0, 0)
    from catdog_hpo.errors import UserError

    with pytest.raises(UserError, match="cannot switch samplers"):
        run(settings(workdir, sampler="grid", trials=4))


# --------------------------------------------------------------------------- journal storage


def test_journal_two_processes_reach_exactly_n(workdir: Path) -> None:
    journal = workdir / "shared" / "catdog.log"
    command = [sys.executable, "-m", "catdog_hpo", "run", "--space", "tiny.yaml", "--sampler", "random",
               "--pruner", "none", "--trials", "4", "--study", "j", "--storage", str(journal),
               "--no-progress", "--heartbeat", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # The images are decoded once first, so both "machines" start on the cache at the same moment.
    main(["run", "--space", "tiny.yaml", "--trials", "1", "--study", "warm", "--storage",
          str(workdir / "warm.log"), "--no-progress"])
    procs = [subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = optuna.load_study(study_name="j", storage=_journal_storage(journal))
    assert count(study) == (4, 0, 0)
    assert sorted(t.number for t in study.trials) == list(range(4))  # no fifth trial, none failed
    assert all("done: 4/4 finished trials" in out for out in outs), outs
    assert Path(f"{journal}.study-lock").exists() and not Path(f"{journal}.lock").exists()


def _journal_storage(path: Path):  # -> BaseStorage
    from catdog_hpo.search.storage import open_storage

    return open_storage(str(path), create=False)


def test_journal_scheme_and_heartbeat_fails_a_silent_trial(workdir: Path) -> None:
    from catdog_hpo.search.storage import open_storage

    storage = open_storage(f"journal:///{workdir}/j/x.log", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="hb", storage=storage)
    alive, dead = study.ask(), study.ask()
    storage.record_heartbeat(alive._trial_id)
    storage.record_heartbeat(dead._trial_id)
    old = time.time() - 60
    os.utime(workdir / "j" / "x.log.heartbeats" / str(dead._trial_id), (old, old))
    assert storage._get_stale_trial_ids(study._study_id) == [dead._trial_id]
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {alive.number: TrialState.RUNNING, dead.number: TrialState.FAIL}


def test_journal_read_commands_refuse_a_missing_file(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["studies", "--storage", "nothing/here.log"]) == 2
    assert "no study store at nothing/here.log" in one_line_error(capsys)


# --------------------------------------------------------------------------- delete and copy


def test_studies_delete_removes_the_trials_artifact_files(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    from catdog_hpo.search.artifacts import artifact_store, upload_training_curves

    url = f"sqlite:///{workdir}/studies/catdog.db"
    (workdir / "studies").mkdir(exist_ok=True)
    store = artifact_store(workdir / "studies")
    history = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_acc": 0.6, "seconds": 1.0, "lr": 1e-3}]
    for name in ("drop", "keep"):
        study = optuna.create_study(study_name=name, storage=url, direction="maximize")
        trial = study.ask()
        upload_training_curves(study, trial, history, store)  # as the objective does, while it runs
        study.tell(trial, 0.6)
    files = lambda: sorted(p for p in (workdir / "studies" / "artifacts").rglob("*") if p.is_file())  # noqa: E731
    assert len(files()) == 4  # an SVG and a CSV per study
    assert main(["studies", "--storage", url, "delete", "drop", "--yes"]) == 0
    assert "and its 2 artifact files" in capsys.readouterr().out
    assert len(files()) == 2  # the kept study's stay


def test_studies_delete_asks_and_copy(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{workdir}/studies/catdog.db"
    make_study(url, "keep", n_complete=2, n_pruned=0, n_failed=0, n_rejected=0)
    make_study(url, "drop", n_complete=2, n_pruned=0, n_failed=0, n_rejected=0)

    assert main(["studies", "copy", "keep", "--to", "copies/all.log", "--storage", url]) == 0
    assert "copied study 'keep' (2 trials)" in capsys.readouterr().out
    copied = optuna.load_study(study_name="keep", storage=_journal_storage(workdir / "copies" / "all.log"))
    original = optuna.load_study(study_name="keep", storage=url)
    assert [t.params for t in copied.trials] == [t.params for t in original.trials]
    assert copied.user_attrs == original.user_attrs
    assert main(["studies", "copy", "keep", "--to", "copies/all.log", "--storage", url]) == 2
    assert "already has a study named 'keep'" in one_line_error(capsys)

    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # no terminal: refuse without --yes
    assert main(["studies", "delete", "drop"]) == 2
    assert "no terminal to confirm on; pass --yes" in one_line_error(capsys)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["studies", "delete", "drop"]) == 1
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["studies", "delete", "drop"]) == 0
    assert "deleted study 'drop' (2 trials)" in capsys.readouterr().out
    assert main(["studies", "--storage", url, "delete", "keep", "--yes"]) == 0  # --storage before the action
    assert optuna.get_all_study_names(url) == []


@pytest.mark.parametrize(("url", "shown"), [
    ("mysql+pymysql://u:pa%40ss@h/db", "mysql+pymysql://u:***@h/db"),  # SQLAlchemy's rendering
    ("postgresql://user:p@ss@host/db", "postgresql://user:***@host/db"),  # and the regex after it
    ("journal:///studies/x.log", "journal:///studies/x.log"),
])
def test_password_mask_uses_sqlalchemy_where_the_url_parses(url: str, shown: str) -> None:
    from catdog_hpo.search.storage import mask_password

    assert mask_password(url) == shown
