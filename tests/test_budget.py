"""The time budget (run --budget), the cost model, admission, baseline first, value = best epoch."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from catdog_hpo.config import BlockConfig, ModelConfig, TrainConfig, TrialConfig
from catdog_hpo.data import DataSource, load_images
from catdog_hpo.errors import ConfigError, UserError
from catdog_hpo.search.budget import spent_seconds, union_length
from catdog_hpo.search.durations import format_duration, parse_duration
from catdog_hpo.search.limits import Limits
from catdog_hpo.search.pruners import PRUNERS, first_rung
from catdog_hpo.search.record import StudyKey, TrialKey
from catdog_hpo.search.run import run
from catdog_hpo.search.study import count
from helpers import TINY_SPACE
from study_factory import run_settings as settings, load_run_study as load

TINY = {**TINY_SPACE, "baseline": {"depth": 1, "block0.channels": 8, "optim.lr": 1e-2}}


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path




# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("45m", 2700), ("2h", 7200), ("600", 600),
                                          ("1.5h", 5400), (" 30S ", 30)])
def test_budget_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0", "0s", "10x", "", "1e3", "h"])
def test_bad_budget_is_a_one_line_error_naming_the_flag(text: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_duration(text)
    assert str(exc.value).startswith(f"--budget {text!r}:") and "\n" not in str(exc.value)


def test_bad_budget_on_the_command_line(capsys: pytest.CaptureFixture, workdir: Path) -> None:
    from catdog_hpo.cli import main

    assert main(["run", "--dataset", "synthetic", "--budget", "tomorrow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["catdog-hpo run: error: --budget 'tomorrow': expected a duration such as 90s, 45m, 2h "
                   "or a number of seconds"]
    assert not (workdir / "studies" / "catdog.db").exists()


def test_union_of_sessions_counts_overlaps_once() -> None:
    assert union_length([(0, 10), (5, 12), (20, 25)]) == 17
    assert union_length([]) == 0
    assert format_duration(90) == "90s" and format_duration(2700) == "45.0m"


# --------------------------------------------------------------------------- the budget


def test_budget_bounded_run_stops_in_time(workdir: Path) -> None:
    budget = 20.0  # calibration (a few s) + several 1-epoch trials on a loaded 2-core box
    s = settings(workdir, trials=None, time_budget=budget, space=str(workdir / "tiny.yaml"))
    start = time.time()
    assert run(s) == 0
    wall = time.time() - start
    study = load(s)
    assert study.user_attrs[StudyKey.BUDGET_S] == budget
    epochs = [h["seconds"] for t in study.trials for h in t.user_attrs.get(TrialKey.HISTORY, [])]
    spent = spent_seconds(study)
    # Within the budget plus one epoch of the slowest trial (and the store's last write).
    assert spent <= budget + max(epochs) + 2.5, (spent, max(epochs))
    assert wall <= budget + max(epochs) + 15  # + loading the images before the clock starts
    finished, running, _ = count(study)
    assert finished >= 2 and running == 0  # "as many as fit": more than one trial ran


def test_resume_spends_only_what_is_left(workdir: Path) -> None:
    budget = 20.0
    first = settings(workdir, trials=None, time_budget=budget, timeout=6.0)
    assert run(first) == 0
    spent_first = spent_seconds(load(first))
    assert spent_first < budget
    # The rerun names no budget: the study's stored one holds, and only what is left is spent.
    again = settings(workdir, trials=None, time_budget=None)
    start = time.time()
    assert run(again) == 0
    second = time.time() - start
    study = load(again)
    epochs = [h["seconds"] for t in study.trials for h in t.user_attrs.get(TrialKey.HISTORY, [])]
    assert spent_seconds(study) <= budget + max(epochs) + 2.5
    assert second <= budget - spent_first + max(epochs) + 10


def test_out_of_budget_configs_are_turned_away_with_the_reason(workdir: Path) -> None:
    # 5,000 trials in 15 s: a fair share of a few ms, so configs are turned away before training.
    # (15 s, not less: calibration and data loading come out of the budget too, and with 4 s a
    # slow start on a loaded machine once left no time to ask for a single config.)
    s = settings(workdir, trials=5000, time_budget=15.0)
    run(s)
    study = load(s)
    rejected = [t for t in study.trials if TrialKey.REJECTED in t.user_attrs]
    assert rejected and all("--budget" in t.user_attrs[TrialKey.REJECTED] for t in rejected)
    assert all(TrialKey.HISTORY not in t.user_attrs for t in rejected)
    assert all(t.constraints.get("turned_away", 0) > 0 for t in rejected)


def test_the_fair_share_weighs_a_configs_expected_cost_under_the_pruner() -> None:
    # One 20-epoch config whose epoch costs X seconds, a budget of 50 X for 20 trials: a fair share
    # of 50 X / 20 x SHARE_SLACK = 5 X. Under SHA (2.74 epochs on average) it fits; under the
    # median rule (12.5 epochs) or no pruner (all 20) it is turned away, with why.
    from catdog_hpo.data import ImageSet
    from catdog_hpo.engine.cost import Calibration, workload
    from catdog_hpo.engine.models import model_cost
    from catdog_hpo.search.admission import RELAX_EVERY
    from catdog_hpo.search.budget import Guard, Plan, StudyClock
    from catdog_hpo.search.trial import reject
    from catdog_hpo.search.pruners import EXPECTED_EPOCHS

    model = ModelConfig(blocks=(BlockConfig(8),), head="gap")
    cfg = TrialConfig(image_size=16, model=model, train=TrainConfig(epochs=20, batch_size=32))
    cost = model_cost(model, 2, 16)
    data = ImageSet(torch.zeros(64, 3, 16, 16, dtype=torch.uint8), torch.zeros(64, dtype=torch.long),
                    torch.zeros(16, 3, 16, 16, dtype=torch.uint8), torch.zeros(16, dtype=torch.long), ("a", "b"), "")
    cal = Calibration(flop_rate=1e9, step_s=1e-4, act_s=1e-9)
    epoch_s = cal.epoch_seconds(workload(cfg, cost.flops, cost.params, 2, 64, 16))

    def guard(pruner: str) -> Guard:
        study = optuna.create_study()
        g = Guard(study, StudyClock(study, 50 * epoch_s), Plan(20, 1, EXPECTED_EPOCHS[pruner]), torch.device("cpu"))
        g._calibration = cal
        return g

    def admit(g: Guard) -> str:
        trial = g.study.ask()
        try:
            g.admit(trial, cfg, cost.flops, cost.params, data)
        except ConfigError as exc:
            reject(trial, str(exc))  # as the objective does: it does not count toward the 20
            g.study.tell(trial, state=TrialState.PRUNED)
            g.refusals.count(refused=True)  # as the worker does
            return str(exc)
        return "admitted"

    assert admit(guard("sha")) == "admitted"
    for pruner in ("median", "none"):
        assert admit(guard(pruner)).startswith("expected") and "fair share" in admit(guard(pruner))
    # Pacing never idles the budget: the share doubles after every RELAX_EVERY refusals in a
    # row, so the median's 12.5 X passes once the share is 4 x 5 X.
    g = guard("median")
    answers = [admit(g) for _ in range(2 * RELAX_EVERY + 1)]
    assert all(a.startswith("expected") for a in answers[:-1]) and answers[-1] == "admitted"
    # It must still finish: 19 X left refuses a 20 X config however many refusals came before.
    g = guard("sha")
    g.clock.budget_s = g.clock.spent() + 19 * epoch_s
    answers = [admit(g) for _ in range(2 * RELAX_EVERY)]
    assert all(a.startswith("predicted") and "left of --budget" in a for a in answers)


def test_the_epochs_a_trial_runs_are_learned_from_the_studys_record() -> None:
    # SHA's theory (2.74 of 20 epochs) is the prior; a study whose finished trials all ran their
    # 20 epochs moves the guard's share towards all of them; trials the budget stopped do not count.
    from catdog_hpo.search.budget import PRIOR_TRIALS, Guard, Plan, StudyClock
    from catdog_hpo.search.pruners import EXPECTED_EPOCHS

    study = optuna.create_study()
    g = Guard(study, StudyClock(study, 100.0), Plan(100, 1, EXPECTED_EPOCHS["sha"]), torch.device("cpu"))
    theory = EXPECTED_EPOCHS["sha"](20) / 20
    assert g.ran_share(20, study.get_trials()) == pytest.approx(theory)

    def finished(epochs_run: int, **extra: object) -> None:
        attrs = {TrialKey.CONFIG: {"train": {"epochs": 20}}, TrialKey.EPOCHS_RUN: epochs_run, **extra}
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs=attrs))

    n = int(PRIOR_TRIALS)
    for _ in range(n):
        finished(20)
    assert g.ran_share(20, study.get_trials()) == pytest.approx((theory + 1) / 2)
    finished(1, **{TrialKey.BUDGET_STOP: "budget spent after epoch 1"})
    finished(1, **{TrialKey.REJECTED: "too big"})
    assert g.ran_share(20, study.get_trials()) == pytest.approx((theory + 1) / 2)


# --------------------------------------------------------------------------- the cost model


def test_cost_model_within_2x_on_the_cpu() -> None:
    from catdog_hpo.engine.cost import calibrate, workload
    from catdog_hpo.engine.models import model_cost
    from catdog_hpo.engine.train import fit

    data = load_images(DataSource(name="synthetic"), 24, Path("studies/cache"))

    def ratios() -> list[float]:
        cal = calibrate(data, torch.device("cpu"))
        out = []
        for channels, batch in [((8,), 64), ((16, 32), 64), ((16, 32, 64), 32), ((32, 32), 128)]:
            model = ModelConfig(blocks=tuple(BlockConfig(c) for c in channels), head="gap", dropout=0.0)
            cfg = TrialConfig(image_size=24, model=model, train=TrainConfig(epochs=2, batch_size=batch))
            cost = model_cost(model, 2, 24)
            w = workload(cfg, cost.flops, cost.params, 2, len(data.train_y), len(data.val_y))
            # The quicker of two epochs: the steady cost, less of other processes' noise on a shared box.
            measured = min(h.seconds for h in fit(cfg, data, torch.device("cpu")).history)
            out.append(measured / cal.epoch_seconds(w))
        return out

    # Calibration and measurement are seconds apart; another process loading the cores in one and
    # not the other skews the ratio (seen: 3.1x with a benchmark running beside the suite). Up to
    # three tries, each calibrating afresh: a wrong model fails all three.
    tries: list[list[float]] = []
    while len(tries) < 3 and not (tries and all(0.5 <= r <= 2.0 for r in tries[-1])):
        tries.append(ratios())
    assert all(0.5 <= r <= 2.0 for r in tries[-1]), tries


def test_trials_record_predicted_and_measured_seconds(workdir: Path) -> None:
    s = settings(workdir, trials=3)
    run(s)
    for t in load(s).get_trials(states=(TrialState.COMPLETE,)):
        assert t.user_attrs[TrialKey.PREDICTED_S] > 0 and t.user_attrs[TrialKey.MEASURED_S] > 0


# --------------------------------------------------------------------------- rejected configs


def test_rejected_configs_do_not_count_and_tpe_proposes_fewer(workdir: Path) -> None:
    space = {**TINY_SPACE, "blocks": {"depth": 1, "channels": {"choices": [8, 12, 16, 256]}},
             "params": {"optim.lr": {"float": [1e-3, 3e-2], "log": True},
                        "model.dropout": {"float": [0.0, 0.5]}}}
    (workdir / "wide.yaml").write_text(yaml.safe_dump(space))
    s = settings(workdir, space=str(workdir / "wide.yaml"), sampler="tpe", trials=24, seed=3,
                 limits=Limits(max_params=1000))  # 256 channels: ~7,000 params, turned away
    assert run(s) == 0
    study = load(s)
    assert count(study)[0] == 24  # 24 trained trials, however many were turned away
    rejected = [TrialKey.REJECTED in t.user_attrs for t in study.trials]
    assert sum(rejected) > 0
    assert len(study.trials) == 24 + sum(rejected)
    # TPE learns from the constraint: fewer turned away in the second half than the first.
    half = len(rejected) // 2
    assert sum(rejected[half:]) < sum(rejected[:half]), rejected


def test_a_sampler_stuck_on_rejected_configs_stops_with_a_message(workdir: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    s = settings(workdir, trials=3, limits=Limits(max_params=10), baseline=False)
    assert run(s) == 1
    assert "configs were all turned away before training" in capsys.readouterr().err


def test_rejections_tolerated_in_a_row_follow_the_share_admitted() -> None:
    from catdog_hpo.search.admission import tolerated

    assert tolerated(0, 0) == 25  # nothing admitted yet: a stuck sampler stops at 25
    assert tolerated(90, 110) == 25  # most admitted: 25 refusals in a row is no accident
    # Random search admitting 7 of 77: 25 in a row happens by chance (0.91^25 ~ 10%); it goes on
    # until a run with under 1% chance (44), and never past 500.
    assert tolerated(7, 77) == 44 and 0.91 ** 44 < 0.02
    assert tolerated(1, 10_000) == 500


# --------------------------------------------------------------------------- baseline, enqueue


def test_trial_zero_is_the_baseline(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    s = settings(workdir, trials=2)
    assert run(s) == 0
    first = load(s).trials[0]
    assert first.number == 0 and first.user_attrs[TrialKey.BASELINE] is True
    assert first.params == TINY["baseline"]
    assert "over the baseline's" in capsys.readouterr().out


def test_no_baseline_and_enqueue_file(workdir: Path) -> None:
    mine = {"depth": 2, "block0.channels": 16, "block1.channels": 8, "optim.lr": 5e-3}
    (workdir / "mine.yaml").write_text(yaml.safe_dump([mine]))
    from catdog_hpo.search.space_files import read_params_file

    s = settings(workdir, trials=2, baseline=False, enqueue=read_params_file(workdir / "mine.yaml"),
                 enqueue_from="mine.yaml")
    assert run(s) == 0
    trials = load(s).trials
    assert trials[0].params == mine and TrialKey.BASELINE not in trials[0].user_attrs
    assert all(TrialKey.BASELINE not in t.user_attrs for t in trials)


def test_enqueue_file_with_a_bad_parameter_is_an_error(workdir: Path) -> None:
    s = settings(workdir, enqueue=({"depth": 1, "block0.channels": 8, "optim.lrr": 1e-3},), enqueue_from="x.yaml")
    with pytest.raises(ConfigError, match=r"--enqueue x.yaml: 'optim.lrr' is not a parameter"):
        run(s)


@pytest.mark.parametrize("name", ["seed-cnn", "resnet18", "quick"])
def test_built_in_spaces_name_a_baseline(name: str) -> None:
    from catdog_hpo.search.space_files import load_space

    assert load_space(name).baseline


# --------------------------------------------------------------------------- value and pruning


def test_value_is_the_best_epoch_as_retrain_keeps(workdir: Path) -> None:
    space = {**TINY, "base": {**TINY["base"], "train": {"epochs": 3, "batch_size": 128}}}
    (workdir / "three.yaml").write_text(yaml.safe_dump(space))
    s = settings(workdir, space=str(workdir / "three.yaml"), trials=2)
    run(s)
    for t in load(s).get_trials(states=(TrialState.COMPLETE,)):
        accs = [h["val_acc"] for h in t.user_attrs[TrialKey.HISTORY]]
        assert t.value == max(accs) == accs[t.user_attrs[TrialKey.BEST_EPOCH] - 1]


def test_pruners_never_act_on_epoch_one() -> None:
    assert first_rung(10) == 2 and first_rung(3) == 2 and first_rung(20) == 5 and first_rung(2) == 1
    for name in ("median", "patient"):
        pruner = PRUNERS[name](10)
        inner = getattr(pruner, "_wrapped_pruner", pruner)
        assert inner._n_warmup_steps == 2


def test_sha_rungs_start_at_epoch_one_only_for_long_trials() -> None:
    from catdog_hpo.search.pruners import EXPECTED_EPOCHS

    # 20 epochs (seed-cnn): rungs at 1, 3, 9; 6 epochs (quick): rungs at 2 and 6.
    assert PRUNERS["sha"](20)._min_resource == 1 and PRUNERS["sha"](6)._min_resource == 2
    assert PRUNERS["hyperband"](20)._min_resource == 1
    # Expected epochs per trial, what the guard weighs: SHA 1 + 2/3 + 6/9 + 11/27; median: all to
    # epoch 5, half of the rest; Hyperband between SHA and all; no pruner: all.
    assert EXPECTED_EPOCHS["sha"](20) == pytest.approx(1 + 2 / 3 + 6 / 9 + 11 / 27)
    assert EXPECTED_EPOCHS["sha"](6) == pytest.approx(2 + 4 / 3)  # rungs at 2 and 6
    assert EXPECTED_EPOCHS["median"](20) == 12.5
    assert EXPECTED_EPOCHS["sha"](20) < EXPECTED_EPOCHS["hyperband"](20) < 20
    assert EXPECTED_EPOCHS["none"](20) == EXPECTED_EPOCHS["pareto"](20) == 20


# --------------------------------------------------------------------------- validation is never the test set


def test_builtin_datasets_validate_on_their_training_split_and_keep_the_test_split(tmp_path: Path) -> None:
    from catdog_hpo.data.builtin import official_test_split
    from helpers import write_fake_cifar, write_fake_pets

    write_fake_cifar(tmp_path / "ds", per_batch=10)
    cifar = DataSource(name="cifar10-catdog", root=str(tmp_path / "ds"))
    data = load_images(cifar, 32, tmp_path / "cache")
    test_x, test_y, _ = official_test_split(cifar, 32)
    assert len(test_y) == 2  # test_batch's one cat and one dog
    seen = {bytes(r) for r in torch.cat([data.train_x, data.val_x]).flatten(1).numpy()}
    assert not seen & {bytes(r) for r in test_x.flatten(1).numpy()}

    write_fake_pets(tmp_path / "ds", n_trainval=8, n_test=4, size=24)
    pets = DataSource(name="oxford-pets", root=str(tmp_path / "ds"))
    data = load_images(pets, 16, tmp_path / "cache")
    assert len(data.train_y) + len(data.val_y) == 8 and len(data.val_y) == 2
    assert len(official_test_split(pets, 16)[1]) == 4
    assert official_test_split(DataSource(name="synthetic"), 16) is None
