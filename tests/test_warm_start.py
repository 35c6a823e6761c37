"""run --warm-start: an earlier study's best configs run first, and its trials are the sampler's
history when it searched the same space and data (search.warm_start)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from catdog_hpo.errors import UserError
from catdog_hpo.search.record import (StudyKey, TrialKey, counts_toward_n, finished_complete, from_history,
                                      tally)
from catdog_hpo.search.run import run
from catdog_hpo.search.warm_start import WarmSource, parse_source
from helpers import TINY_SPACE
from study_factory import load_run_study as load
from study_factory import make_study
from study_factory import run_settings as settings

BASELINE = {"depth": 1, "block0.channels": 8, "optim.lr": 1e-2}
TINY = {**TINY_SPACE, "baseline": BASELINE}
WIDE = {"depth": 2, "block0.channels": 16, "block1.channels": 8, "optim.lr": 5e-3}  # not in NARROW
NARROW = {**TINY, "blocks": {"depth": {"int": [1, 2]}, "channels": {"choices": [8, 32]}}}  # another space


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "narrow.yaml").write_text(yaml.safe_dump(NARROW))
    return tmp_path


def _best(study: optuna.Study, k: int, skip: list[dict]) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best completed trials of ``study`` whose params are not in ``skip``."""
    done = sorted((t for t in study.trials if finished_complete(t)), key=lambda t: (-t.value, t.number))[:k]
    return [t for t in done if t.params not in skip]


def test_warm_start_from_a_study_in_the_same_store(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    src = settings(workdir, study="src", trials=4, seed=1)
    assert run(src) == 0
    source = load(src)
    url = src.storage
    s = settings(workdir, study="dst", trials=4, warm_start=(parse_source("src", url),), warm_start_top=2)
    capsys.readouterr()
    assert run(s) == 0
    out = capsys.readouterr().out
    assert f"warm start: src@{url}: " in out and "same space and data, so its 4 finished trials are the sampler's history" in out
    study = load(s)
    trials = study.trials
    # Trial 0 is the baseline; the source's best two configs (less the baseline's, run once) next.
    expected = _best(source, 2, skip=[BASELINE])
    assert trials[0].user_attrs[TrialKey.BASELINE] is True
    warm = [t for t in trials if TrialKey.WARM_START_FROM in t.user_attrs]
    assert [t.number for t in warm] == list(range(1, 1 + len(expected)))
    assert [t.params for t in warm] == [t.params for t in expected]
    assert [t.user_attrs[TrialKey.WARM_START_FROM] for t in warm] == [f"src@{url}#{t.number}" for t in expected]
    # The source's finished trials are history: COMPLETE, marked, never run here, not counted.
    history = [t for t in study.get_trials(deepcopy=False) if from_history(t)]
    assert sorted(t.user_attrs[TrialKey.WARM_HISTORY_FROM] for t in history) == sorted(
        f"src@{url}#{t.number}" for t in source.trials)
    assert all(t.state == TrialState.COMPLETE and not counts_toward_n(t) and not finished_complete(t) for t in history)
    assert {t.value for t in history} == {t.value for t in source.trials}
    by_number = {f"src@{url}#{t.number}": t for t in source.trials}
    assert all(t.intermediate_values == by_number[t.user_attrs[TrialKey.WARM_HISTORY_FROM]].intermediate_values
               and t.params == by_number[t.user_attrs[TrialKey.WARM_HISTORY_FROM]].params for t in history)
    # Exactly N of its own: the history adds nothing toward --trials.
    own = [t for t in study.trials if not from_history(t)]
    assert tally(study.trials)[0] == 4 == sum(t.state == TrialState.COMPLETE for t in own)
    assert study.user_attrs[StudyKey.WARM_STARTED_FROM] == [f"src@{url}"]
    # show names the source and keeps the history out of the study's own counts and best.
    from catdog_hpo.cli import main

    assert main(["show", "--study", "dst", "--storage", url]) == 0
    shown = capsys.readouterr().out
    assert f"warm start from src@{url}: its best configs are trials {', '.join(str(t.number) for t in warm)}; " \
           "4 of its trials are the sampler's history (not counted)" in shown
    assert "finished 4/4: 4 complete" in shown and "(warm start)" in shown
    best_shown = {int(m) for m in re.findall(r"^\s*(\d+)\s", shown.split("-----", 1)[1], re.M)}
    assert best_shown <= {t.number for t in own}
    assert main(["show", "--study", "dst", "--storage", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["history_trials"] == 4 and doc["states"]["COMPLETE"] == 4
    assert doc["settings"]["warm_started_from"] == [f"src@{url}"]
    assert {b["number"] for b in doc["best"]} <= {t.number for t in own}
    assert {b["warm_start_from"] for b in doc["best"] if b["warm_start_from"]} <= {
        t.user_attrs[TrialKey.WARM_START_FROM] for t in warm}
    # The report's charts draw the study's own trials; the history trained elsewhere.
    from catdog_hpo.view.report import intermediate_figure, own_study

    drawn = {int(re.match(r"trial (\d+)", trace.hovertemplate).group(1)) for trace in intermediate_figure(own_study(study)).data}
    assert drawn == {t.number for t in own if t.intermediate_values}
    assert own_study(source) is source and len(own_study(study).trials) == len(own)
    # A rerun (resume, more trials) applies the source no second time.
    again = settings(workdir, study="dst", trials=5, warm_start=(parse_source("src", url),), warm_start_top=2)
    assert run(again) == 0
    assert "warm start:" not in capsys.readouterr().out
    study = load(again)
    assert len([t for t in study.trials if TrialKey.WARM_START_FROM in t.user_attrs]) == len(warm)
    assert len([t for t in study.trials if from_history(t)]) == len(history)
    assert tally(study.trials)[0] == 5 and study.user_attrs[StudyKey.WARM_STARTED_FROM] == [f"src@{url}"]


def test_an_interrupted_baseline_or_warm_config_keeps_its_origin_on_retry(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the baseline, then during a warm-start config: each rerun is still the
    baseline / the source's config (admission, show, the model card and the summary read it)."""
    import catdog_hpo.search.worker as worker_mod
    from catdog_hpo.search.study import baseline_trial

    src = settings(workdir, study="src", trials=3, seed=1)
    assert run(src) == 0
    real = worker_mod.run_trial
    stop_at = {0, 1}  # the first run's first trial (the baseline), the second's (the warm config)
    calls = {"n": 0}

    def interrupt(trial: optuna.Trial, space: object, overrides: dict, *rest: object) -> float:
        calls["n"] += 1
        if calls["n"] - 1 in stop_at:
            from catdog_hpo.search.spaces import resolve

            resolve(space, trial, overrides)  # its parameters are known, as mid-training
            raise KeyboardInterrupt
        return real(trial, space, overrides, *rest)

    monkeypatch.setattr(worker_mod, "run_trial", interrupt)
    s = settings(workdir, study="dst", trials=3, warm_start=(parse_source("src", src.storage),), warm_start_top=1)
    assert run(s) == 130
    assert run(s) == 130
    monkeypatch.setattr(worker_mod, "run_trial", real)
    assert run(s) == 0
    study = load(s)
    own = [t for t in study.trials if not from_history(t)]
    failed = [t for t in own if t.state == TrialState.FAIL]
    assert len(failed) == 2
    retries = {t.user_attrs[TrialKey.RETRY_OF]: t for t in own if TrialKey.RETRY_OF in t.user_attrs}
    base, warm = failed
    assert base.user_attrs[TrialKey.BASELINE] is True and TrialKey.WARM_START_FROM in warm.user_attrs
    assert retries[base.number].user_attrs[TrialKey.BASELINE] is True
    assert retries[warm.number].user_attrs[TrialKey.WARM_START_FROM] == warm.user_attrs[TrialKey.WARM_START_FROM]
    assert all(r.state == TrialState.COMPLETE and r.params == f.params for f in failed for r in [retries[f.number]])
    assert baseline_trial(study).number == retries[base.number].number  # the attempt that has a value


def test_warm_start_from_another_file_and_space(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    # The source: its baseline and one config of channels 16, which the narrow space has not.
    other = f"sqlite:///{workdir}/studies/other.db"
    src = settings(workdir, study="src", storage=other, trials=2, enqueue=(WIDE,), enqueue_from="wide.yaml")
    assert run(src) == 0
    numbers = {t.params["block0.channels"]: t.number for t in load(src).trials}
    s = settings(workdir, study="dst", space=str(workdir / "narrow.yaml"), trials=2, baseline=False,
                 warm_start=(parse_source(f"src@{other}", "sqlite:///unused.db"),) * 2, warm_start_top=2)  # twice: once
    capsys.readouterr()
    assert run(s) == 0
    out = capsys.readouterr().out.splitlines()
    skipped = [line for line in out if line.startswith("warm start: skipped")]
    assert len(skipped) == 1 and skipped[0].startswith(f"warm start: skipped src@{other}#{numbers[16]}: ")
    assert "16" in skipped[0]
    said = [line for line in out if line.startswith(f"warm start: src@{other}: ")]
    assert len(said) == 1 and "1 of its 2 best configs run first" in said[0]
    assert "it searched another space fingerprint" in said[0] and "not given to the sampler as history" in said[0]
    study = load(s)
    first = study.trials[0]
    assert first.params == BASELINE and first.user_attrs[TrialKey.WARM_START_FROM] == f"src@{other}#{numbers[8]}"
    assert not any(from_history(t) for t in study.trials) and tally(study.trials)[0] == 2


def test_two_workers_apply_the_warm_start_once_and_stop_at_n(workdir: Path) -> None:
    src = settings(workdir, study="src", trials=3, seed=1)
    assert run(src) == 0
    s = settings(workdir, study="dst", trials=4, workers=2, devices=("cpu", "cpu"),
                 warm_start=(parse_source("src", src.storage),), warm_start_top=2)
    assert run(s) == 0  # the parent applies it; each spawned worker opens the study and finds it applied
    study = load(s)
    assert sum(from_history(t) for t in study.trials) == 3 and tally(study.trials)[0] == 4
    assert study.user_attrs[StudyKey.WARM_STARTED_FROM] == [f"src@{src.storage}"]
    assert len({t.user_attrs[TrialKey.WARM_START_FROM] for t in study.trials
                if TrialKey.WARM_START_FROM in t.user_attrs}) == \
        sum(TrialKey.WARM_START_FROM in t.user_attrs for t in study.trials)


def test_history_trials_stay_out_of_n_the_budget_and_the_best(tmp_path: Path) -> None:
    """What every reader of a study does with a history trial better than any of its own."""
    from catdog_hpo.search.budget import Guard, Plan
    from catdog_hpo.search.warm_start import _copied
    from catdog_hpo.ship.trialfile import pick_trial
    from catdog_hpo.view.tables import top_trials

    url = f"sqlite:///{tmp_path}/s.db"
    source = make_study(url, "src", n_complete=3, n_pruned=1, n_failed=0, n_rejected=0)
    study = make_study(url, "dst", n_complete=2, n_pruned=1, n_failed=0, n_rejected=0, seed=1)
    best_src = max((t for t in source.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    copied = [_copied(t, f"src@{url}") for t in source.trials]
    study.add_trials(copied)
    # made better than any of dst's own, so a reader that forgot the rule would pick it
    better = _copied(best_src, f"src@{url}")
    better.values = [1.0]
    study.add_trial(better)
    trials = study.trials
    assert tally(trials) == (3, 0, 0)
    assert {t.number for t in top_trials(study)} <= {t.number for t in trials if not from_history(t)}
    assert not from_history(pick_trial(study, None))
    with pytest.raises(UserError, match=r"--trial \d+: a --warm-start history trial, copied from src@"):
        pick_trial(study, trials[-1].number)
    pruned = next(t for t in trials if from_history(t) and t.state == TrialState.PRUNED)
    assert pruned.intermediate_values  # TPE ranks a pruned history trial by its last accuracy
    guard = Guard.__new__(Guard)
    guard.plan = Plan(trials=10, workers=1)
    assert guard.ran_share(4, trials) == guard.ran_share(4, [t for t in trials if not from_history(t)])


def test_history_curves_set_the_median_bar_but_not_sha_rungs(tmp_path: Path) -> None:
    """Median: a history trial's curve is a completed trial's curve (a bar from the first new
    trial). SHA: its rungs are system attributes, not copied, so history promotes nothing."""
    from catdog_hpo.search.pruners import PRUNERS
    from catdog_hpo.search.warm_start import _copied

    source = make_study(f"sqlite:///{tmp_path}/s.db", "src", n_complete=5, n_pruned=0, n_failed=0, n_rejected=0,
                        epochs=4)
    copied = [_copied(t, "src@x") for t in source.trials]
    for name, prunes in (("median", True), ("sha", False)):
        study = optuna.create_study(direction="maximize", pruner=PRUNERS[name](4))
        study.add_trials(copied)
        trial = study.ask(dict(source.trials[0].distributions))
        for epoch in (1, 2):
            trial.report(0.01, epoch)  # far below every source curve
        assert bool(trial.should_prune()) is prunes, name


def test_bad_warm_start_values_are_one_line_errors(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    from catdog_hpo.cli import main

    url = f"sqlite:///{workdir}/studies/catdog.db"
    base = ["run", "--dataset", "synthetic", "--space", str(workdir / "tiny.yaml"), "--trials", "1",
            "--storage", url]
    cases = [
        (["--warm-start", "@" + url], "--warm-start '@" + url + "': expected STUDY or STUDY@STORAGE"),
        (["--warm-start", "src@"], "--warm-start 'src@': expected STUDY or STUDY@STORAGE"),
        (["--warm-start", "nope"], f"--warm-start nope@{url}: no study named 'nope' in"),
        (["--warm-start", f"x@sqlite:///{workdir}/missing.db"],
         f"--warm-start x@sqlite:///{workdir}/missing.db: no study store at"),
        (["--warm-start", "nope", "--sampler", "grid"], "--warm-start with --sampler grid:"),
        (["--warm-start", "me", "--study", "me"], "--warm-start me@" + url + ": that is this run's own study"),
    ]
    for extra, says in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"catdog-hpo run: error: {says}"), (extra, err)
    with pytest.raises(SystemExit):
        main(base + ["--warm-start", "x", "--warm-start-top", "0"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "catdog-hpo run: error: argument --warm-start-top: 0 must be 1 or more"
    assert not (workdir / "missing.db").exists()


def test_warm_start_in_a_run_config_file(tmp_path: Path) -> None:
    """A list (or one value) under warm-start: is one --warm-start per item."""
    from catdog_hpo.cli import build_parser
    from catdog_hpo.cli import run as run_command
    from catdog_hpo.cli.config_file import apply_config_file

    for given, wanted in ((["a", "b@sqlite:///x.db"], ["a", "b@sqlite:///x.db"]), ("a", ["a"])):
        (tmp_path / "study.yaml").write_text(yaml.safe_dump({"warm-start": given, "warm-start-top": 2}))
        argv = ["run", "--config", str(tmp_path / "study.yaml")]
        args = build_parser().parse_args(argv)  # builds run's parser, which --config re-reads
        assert run_command._PARSER is not None
        apply_config_file(run_command._PARSER, args, argv[1:], tmp_path / "study.yaml")
        assert args.warm_start == wanted and args.warm_start_top == 2


def test_parse_source_splits_at_the_first_at() -> None:
    assert parse_source("s", "sqlite:///a.db") == WarmSource("s", "sqlite:///a.db")
    assert parse_source("s@postgresql://u:pw@h/db", "x") == WarmSource("s", "postgresql://u:pw@h/db")
    assert WarmSource("s", "postgresql://u:pw@h/db").label == "s@postgresql://u:***@h/db"
