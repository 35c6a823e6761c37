"""The study: samplers end to end, pruning, the trial budget, resume, workers, the cost guard."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from catdog_hpo.errors import UserError
from catdog_hpo.search.limits import Limits
from catdog_hpo.search.progress import pace
from catdog_hpo.search.run import run
from catdog_hpo.search.study import count
from helpers import TINY_SPACE
from study_factory import run_settings as settings, load_run_study as load

TINY = TINY_SPACE


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path




@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_each_sampler_end_to_end(workdir: Path, sampler: str) -> None:
    s = settings(workdir, sampler=sampler, trials=3, study=f"s-{sampler}")
    assert run(s) == 0
    study = load(s)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3
    for t in done:
        assert 0.0 <= t.value <= 1.0
        assert t.intermediate_values == {1: t.value}
        assert {"config", "n_params", "flops", "device", "sec_per_epoch", "best_epoch", "history"} <= set(t.user_attrs)
    assert study.user_attrs["sampler"] == sampler and study.user_attrs["target_trials"] == 3


def test_grid_stops_when_exhausted_and_states_its_size(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    s = settings(workdir, sampler="grid", trials=100)
    assert run(s) == 0
    out = capsys.readouterr().out
    assert "grid: 6 points" in out  # depth 1 or 2 (channels 8) x 3 learning rates
    study = load(s)
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 6 and len(set(params)) == 6
    assert count(study) == (6, 0, 0)


def test_same_seed_same_parameters(workdir: Path) -> None:
    a = settings(workdir, sampler="tpe", trials=3, study="a", seed=7)
    b = settings(workdir, sampler="tpe", trials=3, study="b", seed=7)
    run(a), run(b)
    assert [t.params for t in load(a).trials] == [t.params for t in load(b).trials]


def test_resume_after_interrupt_reaches_exactly_n(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import catdog_hpo.search.worker as worker_mod

    real = worker_mod.run_trial
    calls = {"n": 0}

    def interrupt_third(trial: optuna.Trial, space: object, overrides: dict, *rest: object) -> float:
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of training: its parameters are known
            from catdog_hpo.search.spaces import resolve

            resolve(space, trial, overrides)
            raise KeyboardInterrupt
        return real(trial, space, overrides, *rest)

    monkeypatch.setattr(worker_mod, "run_trial", interrupt_third)
    s = settings(workdir, trials=4)
    assert run(s) == 130
    study = load(s)
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and "interrupted" in interrupted[0].user_attrs["fail_reason"]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1  # its params, queued for resume

    monkeypatch.setattr(worker_mod, "run_trial", real)
    assert run(s) == 0
    study = load(s)
    assert count(study) == (4, 0, 0)
    # The interrupted trial's parameters ran first on resume.
    assert study.trials[-2].params == interrupted[0].params
    assert run(s) == 0 and count(load(s)) == (4, 0, 0)  # a third run adds nothing


def test_pruner_prunes_poor_trials(workdir: Path) -> None:
    space = {**TINY, "base": {**TINY["base"], "image_size": 32, "augment": {"crop": "none"},
                              "train": {"epochs": 4, "batch_size": 64}},
             "blocks": {"depth": 2, "channels": 16},
             # lr 1e-6 learns nothing, the others learn: the median pruner stops the first kind early.
             "params": {"optim.lr": {"choices": [1e-2, 2e-2, 1e-6]}}}
    (workdir / "prune.yaml").write_text(yaml.safe_dump(space))
    s = settings(workdir, space=str(workdir / "prune.yaml"), pruner="median", trials=12, seed=1)
    assert run(s) == 0
    study = load(s)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert any(t.params["optim.lr"] == 1e-6 for t in pruned), "no poor trial was pruned"
    assert all(t.user_attrs["epochs_run"] < 4 for t in pruned)
    bad_completed = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params["optim.lr"] == 1e-6]
    assert len(bad_completed) <= 4  # only before the pruner had its 4 start-up trials
    good = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params["optim.lr"] > 1e-6]
    assert good and max(t.value for t in good) > 0.7


def test_configs_asked_by_name_run_all_their_epochs(workdir: Path) -> None:
    """SHA keeps the best of each rung, so a config asked for by name that starts slowly (here
    one that learns nothing) would be cut at its first rung; it runs all its epochs instead, its
    reports still on the rung, while the sampler's configs like it are pruned."""
    space = {**TINY, "base": {**TINY["base"], "image_size": 32, "augment": {"crop": "none"},
                              "train": {"epochs": 4, "batch_size": 64}},
             "blocks": {"depth": 2, "channels": 16}, "params": {"optim.lr": {"choices": [1e-2, 2e-2, 1e-6]}}}
    (workdir / "prune.yaml").write_text(yaml.safe_dump(space))
    asked = ({"optim.lr": 2e-2}, {"optim.lr": 1e-6})  # a good config first: the bar for the second
    s = settings(workdir, space=str(workdir / "prune.yaml"), pruner="sha", trials=10, seed=1,
                 enqueue=asked, enqueue_from="asked.yaml")
    assert run(s) == 0
    study = load(s)
    slow = study.trials[1]
    assert slow.params == {"optim.lr": 1e-6} and slow.user_attrs["enqueued_from"] == "asked.yaml"
    assert slow.state == TrialState.COMPLETE and slow.user_attrs["epochs_run"] == 4
    assert "completed_rung_0" in slow.system_attrs  # the pruner saw it
    proposed = [t for t in study.trials[2:] if t.params["optim.lr"] == 1e-6]
    assert proposed and all(t.state == TrialState.PRUNED for t in proposed)


def test_cost_guard_turns_configs_away_before_training(workdir: Path) -> None:
    s = settings(workdir, trials=3, limits=Limits(max_params=100))
    assert run(s) == 1  # nothing completed
    for t in load(s).trials:
        assert t.state == TrialState.PRUNED
        assert "parameters > --max-params 100" in t.user_attrs["rejected"]
        assert not t.intermediate_values and "history" not in t.user_attrs


def test_infeasible_config_is_rejected_with_reason(workdir: Path) -> None:
    space = {**TINY, "base": {**TINY["base"], "image_size": 8}, "blocks": {"depth": 6, "channels": 8}}
    (workdir / "deep.yaml").write_text(yaml.safe_dump(space))
    s = settings(workdir, space=str(workdir / "deep.yaml"), trials=2)
    run(s)
    for t in load(s).trials:
        assert t.state == TrialState.PRUNED and t.user_attrs["rejected"]


def test_reopening_with_another_space_or_the_grid_is_an_error(workdir: Path) -> None:
    run(settings(workdir, trials=1))
    # Another sampler may continue a study (tests/test_conventions.py), but not the grid.
    with pytest.raises(UserError, match="was made with sampler 'random': a grid study cannot switch"):
        run(settings(workdir, trials=1, sampler="grid"))
    other = {**TINY, "params": {"optim.lr": {"float": [1e-4, 1e-3], "log": True}}}
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(UserError, match="space fingerprint"):
        run(settings(workdir, trials=1))


def test_three_workers_share_one_sqlite_file(workdir: Path) -> None:
    s = settings(workdir, sampler="grid", trials=6, workers=3, devices=("cpu",) * 3)
    assert run(s) == 0
    study = load(s)
    assert count(study) == (6, 0, 0)
    assert not study.get_trials(states=(TrialState.FAIL,))
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params) == 6


def test_three_workers_random_stop_at_exactly_n(workdir: Path) -> None:
    s = settings(workdir, sampler="random", trials=5, workers=3, devices=("cpu",) * 3)
    assert run(s) == 0
    assert count(load(s)) == (5, 0, 0)
    assert len(load(s).trials) == 5


def test_cuda_oom_fails_the_trial_and_the_study_goes_on(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import catdog_hpo.search.worker as worker_mod

    real = worker_mod.run_trial
    calls = {"n": 0}

    def oom_once(*args: object, **kw: object) -> float:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kw)

    monkeypatch.setattr(worker_mod, "run_trial", oom_once)
    s = settings(workdir, trials=2)
    assert run(s) == 0
    study = load(s)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith("CUDA out of memory")
    assert count(study)[0] == 2


def test_storage_password_never_printed(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    s = settings(workdir, storage="postgresql://bob:hunter2@127.0.0.1:1/nope")
    with pytest.raises(UserError) as info:
        run(s)
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    assert "hunter2" not in capsys.readouterr().out


def test_summary_counts_the_runs_wall_time_and_prints_no_absurd_rate(workdir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    # A 2-trial study ends before its worker's session records an end (search.budget writes it
    # every few seconds), so the summary read ~0 s from the store and printed
    # "time: 0s of wall time; 2 trials (2745362618.2 trials/h)".
    s = settings(workdir, trials=2)
    assert run(s) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time: "))
    trial_s = sum(t.duration.total_seconds() for t in load(s).trials)  # one worker: they ran in turn
    rate = re.search(r"; 2 trials \((\S+) trials/h\)", line)
    assert rate is not None, line
    # The run's wall time covers its trials, so its rate is at most theirs; no rate under a second.
    assert rate.group(1) == "-" or float(rate.group(1)) <= 2 * 3600 / trial_s * 1.001, line
    assert pace(2, 2.6e-6, None, None) == "- trials/h" and pace(2, 0.9, 5, None) == "- trials/h"
    assert pace(2, 3600.0, None, None) == "2.0 trials/h"
