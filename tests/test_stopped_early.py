"""A multi-objective trial the Pareto rule stops is told COMPLETE (so TPE keeps working) and is
shown, counted and excluded everywhere as pruned: progress, show, --json, the front, export, card.

Before this rule such trials were told PRUNED, and TPE's split of pruned trials asks for
``study.direction``, which a multi-objective study does not have: from its first model-based
trial on, every trial failed.
"""

from __future__ import annotations


import optuna
import pytest
import yaml
from optuna.trial import TrialState

from catdog_hpo.errors import UserError
from catdog_hpo.search import pareto
from catdog_hpo.search.record import TrialKey, outcome
from helpers import TINY_SPACE
from study_factory import run_settings

TRIALS = 10  # past TPE's 5 start-up trials: the model-based ones are where it broke


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> optuna.Study:
    """A TPE study on accuracy and params in which the rule stops every odd-numbered trial after
    epoch 1 of 2 (a stand-in for the real rule, whose decisions depend on the accuracies)."""
    from catdog_hpo.search.run import run

    workdir = tmp_path_factory.mktemp("stopped")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE))

    def odd_trials_stop(trial, names, costs, epoch, accuracy, last_epoch, rule=None):  # noqa: ANN001, ANN202
        stop = trial.number % 2 == 1 and epoch < last_epoch
        return pareto.Decision(stop, "odd trials stop after epoch 1 (test)" if stop else "runs on")

    mp = pytest.MonkeyPatch()
    mp.setattr(pareto, "decide_for_trial", odd_trials_stop)
    try:
        settings = run_settings(workdir, sampler="tpe", pruner="pareto", objectives=("accuracy", "params"),
                                trials=TRIALS, epochs=2)
        run(settings)
    finally:
        mp.undo()
    return optuna.load_study(study_name=settings.study, storage=settings.storage)


def test_every_trial_finishes_and_stopped_ones_are_complete_with_their_epoch_values(study: optuna.Study) -> None:
    trials = study.get_trials()
    assert len(trials) == TRIALS and not [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.state == TrialState.COMPLETE for t in trials)  # nothing PRUNED: TPE never sees one
    stopped = [t for t in trials if t.number % 2 == 1]
    for t in stopped:
        assert t.user_attrs[TrialKey.STOPPED_EARLY] == 1 and t.user_attrs[TrialKey.EPOCHS_RUN] == 1
        assert t.values[0] == t.intermediate_values[1]  # its best (only) epoch's accuracy
        assert t.values[1] == t.user_attrs[TrialKey.N_PARAMS]
        assert "odd trials stop" in t.user_attrs[TrialKey.PRUNED_BY]
        assert outcome(t) == "PRUNED"
    for t in trials:
        if t.number % 2 == 0:
            assert outcome(t) == "COMPLETE" and sorted(t.intermediate_values) == [1, 2]


def test_stopped_trials_stay_off_the_front_and_out_of_export(study: optuna.Study) -> None:
    from catdog_hpo.ship.trialfile import pick_trial

    assert {t.number % 2 for t in pareto.front_trials(study)} == {0}
    assert pareto.pick_front_point(study).trial.number % 2 == 0
    assert pareto.pick_front_point(study, max_params=10**9).trial.number % 2 == 0
    with pytest.raises(UserError, match=r"--trial 1: the trial is pruned.*stopped early after epoch 1"):
        pick_trial(study, 1)


def test_show_json_and_the_card_count_them_as_pruned(study: optuna.Study) -> None:
    from catdog_hpo.search.progress import trial_line
    from catdog_hpo.ship.model_card import search_record
    from catdog_hpo.view.json_out import study_document
    from catdog_hpo.view.tables import study_header

    half = TRIALS // 2
    assert f"{half} complete, {half} pruned" in study_header(study)
    assert study_document(study, [])["states"]["PRUNED"] == half
    assert trial_line(study.trials[1]).startswith("trial    1 pruned ")
    front = pareto.pick_front_point(study)
    card = search_record(study, front.trial, front.rule, front.front, [], "sqlite:///studies/x.db")
    assert card["trials"]["complete"] == half and card["trials"]["pruned"] == half
