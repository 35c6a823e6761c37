"""`catdog-hpo studies` and `catdog-hpo show`: read-only tables of a study store."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pandas as pd
import pytest

from catdog_hpo.cli import main
from catdog_hpo.view.tables import format_table, study_summaries, top_trials
from catdog_hpo.search.storage import open_storage
from study_factory import FAIL_REASON, make_study


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two studies: "tpe-run" (6 complete, 4 pruned incl. 1 rejected, 1 failed, 1 running) and
    "random-run" (3 complete)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('show')}/catdog.db"
    storage = open_storage(url)
    make_study(storage, "tpe-run", sampler="tpe", n_running=1)
    make_study(storage, "random-run", sampler="random", n_complete=3, n_pruned=0, n_failed=0, n_rejected=0, seed=3)
    return url


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[list[str]]:
    """The data rows of the first table in ``out`` (below its dashed rule), split on 2+ spaces."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if re.fullmatch(r"[- ]+", line) and "--" in line)
    rows = []
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_studies_lists_every_study_with_counts(store: str, capsys) -> None:
    code, out, err = run_cli(capsys, "studies", "--storage", store)
    assert code == 0 and err == ""
    header = out.splitlines()[0].split()
    assert header == ["name", "sampler", "space", "complete", "pruned", "fail", "running", "waiting",
                      "best", "started"]
    rows = {r[0]: r for r in table_rows(out)}
    assert set(rows) == {"tpe-run", "random-run"}
    storage = open_storage(store)
    best = optuna.load_study(study_name="tpe-run", storage=storage).best_value
    assert rows["tpe-run"][1:9] == ["tpe", "seed-cnn", "6", "4", "1", "1", "0", f"{best:.4f}"]
    assert rows["random-run"][1:8] == ["random", "seed-cnn", "3", "0", "0", "0", "0"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", rows["tpe-run"][9])


def test_study_summaries_best_follows_direction(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/d.db")
    study = optuna.create_study(study_name="loss", storage=storage, direction="minimize")
    for v in (0.5, 0.2, 0.9):
        study.add_trial(optuna.trial.create_trial(value=v))
    (row,) = study_summaries(storage)
    assert row["best"] == 0.2 and row["complete"] == 3 and row["sampler"] == "-"


def test_studies_on_an_empty_store(tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{tmp_path}/empty.db"
    open_storage(url)  # creates the tables, no study
    code, out, err = run_cli(capsys, "studies", "--storage", url)
    assert code == 0 and "no studies in" in out and "catdog-hpo run" in out


def test_studies_on_a_missing_file_does_not_create_it(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "studies", "--storage", f"sqlite:///{tmp_path}/nope/catdog.db")
    assert code == 2 and "no study store at" in err and err.count("\n") == 1
    assert not (tmp_path / "nope").exists()


def test_show_prints_the_best_trials(store: str, capsys) -> None:
    code, out, err = run_cli(capsys, "show", "--study", "tpe-run", "--storage", store, "--top", "3")
    assert code == 0
    assert out.startswith("study tpe-run (sampler tpe, pruner median, space seed-cnn, data dataset:synthetic)")
    assert "6 complete, 4 pruned (1 rejected before training), 1 fail, 1 running" in out
    assert f"failed x1: {FAIL_REASON}" in out
    rows = table_rows(out.split("\n\n", 1)[1])
    assert len(rows) == 3
    study = optuna.load_study(study_name="tpe-run", storage=open_storage(store))
    best = top_trials(study, 3)
    assert [int(r[0]) for r in rows] == [t.number for t in best]
    assert [float(r[1]) for r in rows] == [round(t.value, 4) for t in best]
    assert float(rows[0][1]) == round(study.best_value, 4)
    for row, t in zip(rows, best):
        assert row[2] == "COMPLETE" and row[3] == str(t.user_attrs["epochs_run"])
        assert row[4] == f"{t.user_attrs['sec_per_epoch']:.2f}"
        # columns 5 and 6: the cost model's predicted and the measured seconds ("-" when not recorded)
        assert f"model.width={t.params['model.width']}" in row[8]


def test_show_csv_writes_every_trial(store: str, tmp_path: Path, capsys) -> None:
    csv = tmp_path / "out" / "all.csv"
    code, out, _ = run_cli(capsys, "show", "--study", "tpe-run", "--storage", store, "--csv", str(csv))
    assert code == 0 and f"wrote 12 trials to {csv}" in out
    df = pd.read_csv(csv)
    assert len(df) == 12
    assert sorted(df.state.unique()) == ["COMPLETE", "FAIL", "PRUNED", "RUNNING"]
    assert {"params_optim.lr", "user_attrs_n_params", "user_attrs_sec_per_epoch"} <= set(df.columns)


def test_show_unknown_study_lists_names(store: str, capsys) -> None:
    code, out, err = run_cli(capsys, "show", "--study", "tpe", "--storage", store)
    assert code == 2 and out == ""
    assert err.strip() == f"catdog-hpo show: error: no study named 'tpe' in {store} (studies: tpe-run, random-run)"


def test_show_study_without_completed_trials(tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    make_study(url, "early", n_complete=0, n_pruned=1, n_failed=0, n_rejected=0, n_running=1)
    code, out, _ = run_cli(capsys, "show", "--study", "early", "--storage", url)
    assert code == 0 and "no completed trial yet" in out and "1 pruned, 1 running" in out


def test_show_rejects_a_bad_top(store: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["show", "--study", "tpe-run", "--storage", store, "--top", "0"])
    assert "--top: 0 must be 1 or more" in capsys.readouterr().err


def test_format_table_aligns_numbers_right() -> None:
    text = format_table(["name", "n"], [["a", 5], ["bbb", 12]])
    assert text.splitlines() == ["name   n", "----  --", "a      5", "bbb   12"]
