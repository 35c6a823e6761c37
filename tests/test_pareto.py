"""Multi-objective pieces in-process: the Pareto pruning rule on a constructed front, the front
itself, the objectives registry's errors, and latency measurement."""

from __future__ import annotations

import pytest

from catdog_hpo.errors import UserError
from catdog_hpo.search.pareto import ParetoRule, Point, dominates, front_indices

# A constructed front of accuracy against params, with per-epoch curves (epochs 1..3):
# a cheap model with modest accuracy, a mid one, and a big accurate one. All three are on it.
CHEAP = Point(0, 0.70, {"params": 1_000}, {1: 0.60, 2: 0.66, 3: 0.70})
MID = Point(1, 0.85, {"params": 20_000}, {1: 0.72, 2: 0.80, 3: 0.85})
BIG = Point(2, 0.95, {"params": 500_000}, {1: 0.88, 2: 0.93, 3: 0.95})
FRONT = [CHEAP, MID, BIG]
RULE = ParetoRule(margin=0.02)


def test_constructed_front_is_all_non_dominated() -> None:
    values = [[p.accuracy, p.costs["params"]] for p in FRONT]
    dirs = ["maximize", "minimize"]
    assert front_indices(values, dirs) == [0, 1, 2]
    # A model that is both bigger and less accurate than MID is dominated.
    assert front_indices(values + [[0.80, 30_000]], dirs) == [0, 1, 2]
    assert dominates([0.85, 20_000], [0.80, 30_000], dirs) and not dominates([0.80, 30_000], [0.85, 20_000], dirs)
    assert not dominates([0.9, 10], [0.9, 10], dirs)  # equal points do not dominate each other


def test_a_cheap_modest_model_is_not_pruned_for_lagging_the_big_ones() -> None:
    # 2k params at 0.62 after epoch 1: far behind MID (0.72) and BIG (0.88) at the same epoch,
    # but they cost more. Only CHEAP (1k) costs no more, and 0.62 + 0.02 >= its 0.60: kept.
    d = RULE.decide({"params": 2_000}, epoch=1, accuracy=0.62, last_epoch=3, completed=FRONT)
    assert not d.prune and d.reference == CHEAP.number
    # A plain median rule over every completed trial would have pruned it (median of 0.60, 0.72, 0.88).
    assert 0.62 < sorted(p.curve[1] for p in FRONT)[1]


def test_the_cheapest_model_so_far_is_never_pruned() -> None:
    d = RULE.decide({"params": 500}, epoch=1, accuracy=0.10, last_epoch=3, completed=FRONT)
    assert not d.prune and d.reference is None


def test_a_costly_model_behind_the_front_at_its_cost_is_pruned() -> None:
    # 600k params: every front point costs less; BIG is the best of them, 0.88 at epoch 1.
    d = RULE.decide({"params": 600_000}, epoch=1, accuracy=0.80, last_epoch=3, completed=FRONT)
    assert d.prune and d.reference == BIG.number and "trial 2" in d.reason
    # Within the margin of BIG's curve: kept. At epoch 2 the reference is BIG's epoch-2 value.
    assert not RULE.decide({"params": 600_000}, 1, 0.87, 3, FRONT).prune
    assert RULE.decide({"params": 600_000}, 2, 0.90, 3, FRONT).prune  # 0.92 < 0.93
    # A mid-sized model is compared with MID (the best that costs no more), not with BIG.
    assert not RULE.decide({"params": 50_000}, 1, 0.71, 3, FRONT).prune
    assert RULE.decide({"params": 50_000}, 1, 0.60, 3, FRONT).prune


def test_never_pruned_on_its_last_epoch_and_every_cost_must_be_no_higher() -> None:
    assert not RULE.decide({"params": 600_000}, 3, 0.10, 3, FRONT).prune  # the result is paid for
    two = [Point(0, 0.9, {"params": 100, "latency": 5.0}, {1: 0.9})]
    # Cheaper in params but slower: the point does not cost "no more", so there is nothing to beat.
    assert not RULE.decide({"params": 200, "latency": 1.0}, 1, 0.1, 3, two).prune
    assert RULE.decide({"params": 200, "latency": 6.0}, 1, 0.1, 3, two).prune
    # A reference that ran fewer epochs: its final accuracy is the bar.
    assert RULE.decide({"params": 200, "latency": 6.0}, 2, 0.5, 3, two).reason.endswith("on the front)")


def test_wilson_interval() -> None:
    from catdog_hpo.ship.model_card import wilson

    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson(10, 10)  # all right: the interval still has room below 1
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)


def test_objective_names_are_checked() -> None:
    from catdog_hpo.search.objectives import OBJECTIVES, directions, parse_objectives

    assert parse_objectives("accuracy, params") == ("accuracy", "params")
    assert directions(("accuracy", "params", "latency")) == ["maximize", "minimize", "minimize"]
    assert set(OBJECTIVES) == {"accuracy", "params", "flops", "latency"}
    for bad, words in (("accuracy,size", "unknown objective 'size'"), ("params,accuracy", "first objective"),
                       ("accuracy,params,params", "twice"), (",", "name at least one")):
        with pytest.raises(UserError, match=words) as exc:
            parse_objectives(bad)
        assert "\n" not in str(exc.value)


def test_grid_and_cmaes_refuse_several_objectives() -> None:
    from catdog_hpo.search.study import check_goal

    with pytest.raises(UserError, match="--sampler grid"):
        check_goal("grid", "pareto", ("accuracy", "params"))
    with pytest.raises(UserError, match="--pruner sha"):
        check_goal("tpe", "sha", ("accuracy", "params"))
    with pytest.raises(UserError, match="--pruner pareto: needs several objectives"):
        check_goal("tpe", "pareto", ("accuracy",))
    check_goal("nsga2", "pareto", ("accuracy", "latency"))
    check_goal("grid", "median", ("accuracy",))


def test_latency_is_measured_with_its_method() -> None:
    import torch

    from catdog_hpo.config import BlockConfig, ModelConfig
    from catdog_hpo.engine.latency import measure_config

    small = measure_config(ModelConfig(blocks=(BlockConfig(8),), head="gap"), 2, 16, torch.device("cpu"),
                           repeats=7, warmup=1)
    assert small.ms > 0 and small.repeats == 7 and small.device == "cpu"
    assert "median of 7 timed runs" in small.method and "batch-1" in small.method


# --------------------------------------------------------------------------- a constructed study


def make_mo_study(storage: object, name: str = "mo") -> object:
    """A two-objective study (accuracy, params) built directly: 6 completed trials, 3 of them on
    the front (0, 2, 4), plus one pruned trial."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution

    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    study.set_metric_names(["accuracy", "params"])
    study.set_user_attr("objectives", ["accuracy", "params"])
    dists = {"depth": IntDistribution(1, 3), "optim.lr": FloatDistribution(1e-4, 1e-1, log=True)}
    rows = [(0.70, 1_000, 1), (0.65, 5_000, 1), (0.85, 20_000, 2), (0.80, 40_000, 2), (0.95, 500_000, 3), (0.90, 600_000, 3)]
    for acc, params, depth in rows:
        study.add_trial(optuna.trial.create_trial(
            params={"depth": depth, "optim.lr": 1e-3}, distributions=dists, values=[acc, params],
            intermediate_values={1: acc - 0.1, 2: acc}, user_attrs={"n_params": params, "epochs_run": 2}))
    study.add_trial(optuna.trial.create_trial(
        params={"depth": 3, "optim.lr": 1e-2}, distributions=dists, state=optuna.trial.TrialState.PRUNED,
        intermediate_values={1: 0.3}, user_attrs={"n_params": 700_000, "pruned_by": "constructed"}))
    return study


def test_front_table_and_pick_on_a_constructed_study(tmp_path) -> None:
    from catdog_hpo.search.pareto import front_trials, pick_front_point
    from catdog_hpo.search.storage import open_storage
    from catdog_hpo.view.pareto import format_front
    from catdog_hpo.view.report import render_report

    study = make_mo_study(open_storage(f"sqlite:///{tmp_path}/mo.db"))
    assert [t.number for t in front_trials(study)] == [4, 2, 0]  # most accurate first
    assert pick_front_point(study).trial.number == 4  # the default pick: highest accuracy on the front
    assert pick_front_point(study, max_params=30_000).trial.number == 2
    with pytest.raises(UserError, match="the smallest, trial 0, has 1,000 parameters"):
        pick_front_point(study, max_params=10)
    with pytest.raises(UserError, match="did not time its trials"):
        pick_front_point(study, max_latency=5.0)
    table = format_front(study).splitlines()
    assert table[0] == "Pareto front (3 trials, cheapest first):" and table[3].split()[:3] == ["0", "0.7000", "1k"]
    page = render_report(study)
    assert 'id="pareto"' in page and 'id="tradeoff"' in page and "accuracy: 0.9500" in page
