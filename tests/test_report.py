"""`catdog-hpo report`: one self-contained HTML file with every section, and trials.csv."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from catdog_hpo.cli import main
from catdog_hpo.errors import UserError
from catdog_hpo.view.report import (
    MIN_TRIALS_FOR_IMPORTANCE,
    STATE_COLORS,
    best_so_far,
    intermediate_figure,
    render_report,
    write_report,
)
from catdog_hpo.search.storage import open_storage
from study_factory import FAIL_REASON, REJECT_REASON, make_study

PLOT_SECTIONS = ("history", "intermediate", "parallel", "importance", "slice")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, optuna.storages.BaseStorage]:
    """One store: "demo" (6 complete, 3 pruned, 1 failed, 1 rejected), "grid" and "random"
    to compare with, "few" (2 complete: too few for importances) and "waiting" (none complete)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('report')}/studies/catdog.db"
    storage = open_storage(url)
    make_study(storage, "demo", sampler="tpe")
    make_study(storage, "grid", sampler="grid", n_complete=5, n_pruned=0, n_failed=0, n_rejected=0, seed=1)
    make_study(storage, "random", sampler="random", n_complete=4, n_pruned=1, n_failed=0, n_rejected=0, seed=2)
    make_study(storage, "few", n_complete=2, n_pruned=1, n_failed=0, n_rejected=0)
    make_study(storage, "waiting", n_complete=0, n_pruned=2, n_failed=1, n_rejected=0, n_running=1)
    return url, storage


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML."""
    return dict(re.findall(r'<section id="([\w-]+)" class="section">(.*?)</section>', page, re.S))


def test_report_has_every_section_with_a_chart(store, tmp_path: Path) -> None:
    url, storage = store
    files = write_report(storage, "demo", out_dir=tmp_path / "out")
    assert files.html == tmp_path / "out" / "report.html" and files.csv == tmp_path / "out" / "trials.csv"
    page = files.html.read_text()
    found = sections(page)
    assert list(found) == ["summary", *PLOT_SECTIONS, "top-trials"]
    for sid in PLOT_SECTIONS:
        assert "plotly-graph-div" in found[sid] and 'class="note"' not in found[sid], sid
    assert "6 complete" in found["summary"] and "4 pruned (1 rejected before training)" in found["summary"] and "1 fail" in found["summary"]
    assert FAIL_REASON in found["summary"]
    # Self-contained: plotly.js inlined exactly once, nothing fetched from the network.
    assert page.count(get_plotlyjs()[:200]) == 1
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)


def test_top_trials_table_is_ranked_and_complete(store) -> None:
    _, storage = store
    study = optuna.load_study(study_name="demo", storage=storage)
    table = sections(render_report(study))["top-trials"]
    rows = re.findall(r"<tr><td>(\d+)</td><td>([\d.]+)</td>", table)
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: -t.value)
    assert [int(n) for n, _ in rows] == [t.number for t in complete]
    assert [float(v) for _, v in rows] == [round(t.value, 4) for t in complete]
    for header in ("params", "flops", "s/epoch", "epochs", "hyperparameters"):
        assert f"<th>{header}</th>" in table
    assert "optim.lr=" in table


def test_intermediate_values_coloured_by_state(store) -> None:
    _, storage = store
    study = optuna.load_study(study_name="demo", storage=storage)
    fig = intermediate_figure(study)
    by_state: dict[str, int] = {}
    for trace in fig.data:
        assert trace.line.color == STATE_COLORS[trace.legendgroup]
        by_state[trace.legendgroup] = by_state.get(trace.legendgroup, 0) + 1
    # The rejected trial (PRUNED, no per-epoch values) draws no curve.
    assert by_state["COMPLETE"] == 6 and by_state["PRUNED"] == 3
    pruned_lengths = {len(t.x) for t in fig.data if t.legendgroup == "PRUNED"}
    complete_lengths = {len(t.x) for t in fig.data if t.legendgroup == "COMPLETE"}
    assert max(pruned_lengths) < min(complete_lengths)  # pruned curves stop early


def test_compare_chart_against_trial_number_and_wall_time(store, tmp_path: Path) -> None:
    url, _ = store
    assert main(["report", "--study", "demo", "--compare", "grid", "random", "--storage", url,
                 "--out", str(tmp_path)]) == 0
    compare = sections((tmp_path / "report.html").read_text())["compare"]
    assert compare.count("plotly-graph-div") == 2
    for name in ("demo (tpe)", "grid (grid)", "random (random)"):
        assert name in compare
    assert "trial number" in compare and "wall time" in compare


def test_best_so_far_is_the_running_best(store) -> None:
    _, storage = store
    study = optuna.load_study(study_name="demo", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    x, y = best_so_far(study, "trial")
    assert x == [t.number for t in complete]
    assert y == [max(t.value for t in complete[: i + 1]) for i in range(len(complete))]
    minutes, y_time = best_so_far(study, "time")
    assert minutes == sorted(minutes) and minutes[0] >= 0 and y_time[-1] == study.best_value


def test_best_so_far_of_a_multi_objective_study_is_its_accuracy() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])  # accuracy, params
    for acc, params in [(0.6, 10.0), (0.8, 500.0), (0.7, 5.0)]:
        trial = study.ask()
        study.tell(trial, [acc, params])
    assert best_so_far(study, "trial") == ([0.0, 1.0, 2.0], [0.6, 0.8, 0.8])
    assert best_so_far(study, "time")[1] == [0.6, 0.8, 0.8]


def test_trials_csv_has_every_trial_and_flattened_user_attrs(store, tmp_path: Path) -> None:
    _, storage = store
    files = write_report(storage, "demo", out_dir=tmp_path)
    df = pd.read_csv(files.csv)
    assert len(df) == 11
    for col in ("number", "value", "state", "datetime_start", "duration", "params_optim.lr",
                "params_model.width", "user_attrs_n_params", "user_attrs_flops", "user_attrs_sec_per_epoch",
                "user_attrs_epochs_run", "user_attrs_best_epoch", "user_attrs_fail_reason",
                "user_attrs_rejected", "user_attrs_config.optim.lr", "user_attrs_history"):
        assert col in df.columns, col
    assert not [c for c in df.columns if c.startswith("system_attrs")]
    assert df.loc[df.state == "FAIL", "user_attrs_fail_reason"].tolist() == [FAIL_REASON]
    assert df.loc[df.user_attrs_rejected.notna(), "state"].tolist() == ["PRUNED"]
    assert df.user_attrs_rejected.dropna().tolist() == [REJECT_REASON]
    assert (df["params_optim.lr"] == df["user_attrs_config.optim.lr"]).all()


def test_too_few_trials_for_importances_gives_a_note(store, tmp_path: Path) -> None:
    _, storage = store
    page = write_report(storage, "few", out_dir=tmp_path).html.read_text()
    importance = sections(page)["importance"]
    assert "plotly-graph-div" not in importance
    assert f"at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials" in importance and "has 2" in importance
    assert "plotly-graph-div" in sections(page)["history"]


def test_study_without_completed_trial_is_a_one_line_error(store, tmp_path: Path, capsys) -> None:
    url, _ = store
    assert main(["report", "--study", "waiting", "--storage", url, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("catdog-hpo report: error: study 'waiting' has no completed trial yet "
                   "(2 pruned, 1 fail, 1 running): nothing to report")
    assert not (tmp_path / "r").exists()


def test_unknown_study_lists_the_studies(store, capsys) -> None:
    url, storage = store
    assert main(["report", "--study", "nope", "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "no study named 'nope'" in err and "(studies: demo, grid, random, few, waiting)" in err
    with pytest.raises(UserError, match="no study named 'other'"):
        write_report(storage, "demo", compare=["other"])


def test_default_out_folder(store, tmp_path: Path, monkeypatch, capsys) -> None:
    url, _ = store
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--study", "grid", "--storage", url]) == 0
    assert (tmp_path / "studies" / "reports" / "grid" / "report.html").is_file()
    assert (tmp_path / "studies" / "reports" / "grid" / "trials.csv").is_file()
    assert "studies/reports/grid/report.html" in capsys.readouterr().out


def test_flops_shown_are_the_shipped_models() -> None:
    """A TTA trial's model as shipped runs the network twice: the top table and ``show --json``
    give that figure (``inference_flops``), and a trial recorded before the key, its one forward."""
    from catdog_hpo.view.json_out import trial_document

    study = optuna.create_study(direction="maximize")
    dist = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for value, attrs in ((0.9, {"flops": 1_000, "inference_flops": 2_000}), (0.8, {"flops": 7_000})):
        study.add_trial(optuna.trial.create_trial(value=value, params={"optim.lr": 1e-3}, distributions=dist,
                                                  user_attrs={"n_params": 10, **attrs}))
    table = sections(render_report(study))["top-trials"]
    assert re.findall(r"<tr><td>\d+</td><td>[\d.]+</td><td>10</td><td>([^<]+)</td>", table) == ["2k", "7k"]
    docs = [trial_document(t) for t in study.trials]
    assert [(d["flops"], d["inference_flops"]) for d in docs] == [(1_000, 2_000), (7_000, 7_000)]
