"""Accuracy against cost end to end through the real console script, on `synthetic`:
run --objectives -> show -> report -> export --pareto -> retrain -> MODEL_CARD.md.

A tiny space (16 px, one or two small blocks, 2 epochs so the Pareto rule has an epoch to prune
at) keeps the whole chain to well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from helpers import TINY_SPACE
from test_ship_e2e import cli

pytestmark = pytest.mark.slow

STUDY = "tiny-tpe-synthetic-vs-params-vs-latency"  # run's default name for these flags


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cwd = tmp_path_factory.mktemp("mo")
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    run = cli(cwd, "run", "--space", "tiny.yaml", "--dataset", "synthetic", "--objectives", "accuracy,params,latency",
              "--trials", "5", "--epochs", "2", "--seed", "1", "--no-progress")
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{cwd}/studies/catdog.db")
    return {"cwd": cwd, "run": run, "study": study}


def test_run_makes_a_multi_objective_study_with_latency_recorded(chain: dict) -> None:
    study = chain["study"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    assert study.metric_names == ["accuracy", "params", "latency"]
    assert study.user_attrs["objectives"] == ["accuracy", "params", "latency"] and study.user_attrs["pruner"] == "pareto"
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert done and "Pareto front:" in chain["run"].stdout
    for t in done:
        assert t.values[1] == t.user_attrs["n_params"] and t.values[2] == t.user_attrs["latency_ms"] > 0
        assert "median of" in t.user_attrs["latency_method"] and "on cpu" in t.user_attrs["latency_method"]
        # per-epoch accuracy, recorded without Trial.report; a trial the rule stopped is
        # COMPLETE (the samplers learn from it) and marked with the epoch it stopped after
        stopped = t.user_attrs.get("stopped_early")
        assert sorted(t.intermediate_values) == ([1] if stopped else [1, 2])
        if stopped:
            assert "no more costly" in t.user_attrs["pruned_by"]
    for t in study.get_trials(states=(optuna.trial.TrialState.PRUNED,)):
        assert "rejected" in t.user_attrs  # only configs turned away before training are PRUNED


def test_show_and_report_draw_the_front(chain: dict) -> None:
    cwd = chain["cwd"]
    shown = cli(cwd, "show", "--study", STUDY).stdout
    assert "Pareto front (" in shown and "accuracy  params  latency" in shown.replace("   ", "  ")
    cli(cwd, "report", "--study", STUDY)
    page = (cwd / "studies" / "reports" / STUDY / "report.html").read_text()
    for section in ('id="pareto"', 'id="tradeoff"', 'id="objective-history"', "Pareto front"):
        assert section in page


def test_export_pareto_by_constraint_then_retrain_writes_the_model_card(chain: dict) -> None:
    cwd, study = chain["cwd"], chain["study"]
    done = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if "stopped_early" not in t.user_attrs]
    cheapest = min(done, key=lambda t: (t.values[1], -t.values[0]))
    limit = int(cheapest.values[1])
    # The most accurate trial within the limit (ties to the cheaper) is what export picks.
    want = min((t for t in done if t.values[1] <= limit), key=lambda t: (-t.values[0], t.values[1], t.values[2], t.number))
    export = cli(cwd, "export", "--study", STUDY, "--pareto", "--max-params", str(limit))
    assert f"exported trial {want.number} " in export.stdout
    assert f"picked: the most accurate completed trial with at most {limit:,} parameters" in export.stdout
    config = cwd / "studies" / "exports" / f"{STUDY}-trial{want.number}.yaml"
    doc = yaml.safe_load(config.read_text())
    assert doc["search"]["picked"]["trial"] == want.number and doc["search"]["sampler"] == "tpe"

    out = cwd / "model"
    cli(cwd, "retrain", "--config", str(config), "--device", "cpu", "--no-export", "--seeds", "2", "--out", "model",
        "--no-progress")
    card = (out / "MODEL_CARD.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    counts = doc["search"]["trials"]
    assert counts["total"] == len(study.trials)
    assert f"- Trials: {counts['total']} run, {counts['complete']} completed, {counts['pruned']} pruned" in card
    assert f"Study: {STUDY}; sampler tpe, pruner pareto" in card
    assert f"{metrics['n_params']:,} parameters" in card and metrics["latency"]["ms"] > 0
    assert "Wilson, n = " in card and "± " in card and "over 2 seed(s)" in card
    assert "| true \\ predicted |" in card
    base = doc["search"]["baseline"]  # run's baseline trial, when the study has one
    assert (f"Baseline: trial {base['trial']}" if base else "Baseline: n/a") in card
    assert f"catdog-hpo export --study {STUDY} --pareto --max-params {limit}" in card
    assert "--objectives accuracy,params,latency" in card and "catdog-hpo retrain --config" in card
    assert "not photographs" in card  # the synthetic data's limitation


@pytest.mark.parametrize("args, words", [
    (("--objectives", "accuracy,size"), "unknown objective 'size'"),
    (("--objectives", "accuracy,params", "--sampler", "grid"), "--sampler grid"),
])
def test_bad_objectives_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    proc = cli(tmp_path, "run", *args, ok=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "studies").exists()  # refused before any store or data
