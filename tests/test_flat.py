"""run --stop-when-flat (catdog_hpo.search.flat): the rule as a table, and a whole study it ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from catdog_hpo.data import DataSource
from catdog_hpo.search.flat import MIN_SINCE, MIN_TRIALS, flat, noise
from catdog_hpo.search.record import counts_toward_n
from helpers import TINY_SPACE, write_image_folder
from study_factory import load_run_study, run_settings

N = 1000  # validation images: noise at 0.80 is 0.0126


def test_noise_is_the_binomial_standard_error() -> None:
    assert noise(0.8, 1000) == pytest.approx(0.01265, abs=1e-5)
    assert noise(1.0, 32) == 0.0


# (why, finished trials' values in finishing order, answer: None or a phrase of the reason)
FLAT = [
    ("fewer than MIN_TRIALS: go on", [0.8] * (MIN_TRIALS - 1), None),
    ("best at trial 1, MIN_TRIALS completed: flat", [0.8] + [0.7] * (MIN_TRIALS - 1), "at completed trial 1"),
    ("best at trial 15 of 20: go on (5 since < 15)", [0.7] * 14 + [0.8] + [0.7] * 5, None),
    ("best at trial 15 of 30: flat (15 since)", [0.7] * 14 + [0.8] + [0.7] * 15, "the 15 completed since"),
    ("a gain within the noise does not reset", [0.7] * 9 + [0.80] + [0.7] * 5 + [0.81] + [0.7] * 4,
     "at completed trial 10"),
    ("a gain beyond the noise resets", [0.7] * 9 + [0.80] + [0.7] * 5 + [0.83] + [0.7] * 4, None),
    # A pruner stops most trials after an epoch or three: they count toward MIN_TRIALS, not as
    # patience, since only a completed trial could have set a new best.
    ("pruned trials are no patience", [0.8] + [None] * (MIN_TRIALS - 1), None),
    (f"{MIN_SINCE - 1} completed since the baseline: go on", [0.8] + [None] * MIN_TRIALS + [0.7] * (MIN_SINCE - 1),
     None),
    (f"{MIN_SINCE} completed since the baseline: flat", [0.8] + [None] * MIN_TRIALS + [0.7] * MIN_SINCE,
     f"the {MIN_SINCE} completed since"),
    ("nothing scored yet", [None] * (MIN_TRIALS + 5), None),
]


@pytest.mark.parametrize("values,answer", [row[1:] for row in FLAT], ids=[row[0] for row in FLAT])
def test_flat(values: list[float | None], answer: str | None) -> None:
    reason = flat(values, N)
    if answer is None:
        assert reason is None
    else:
        assert reason is not None and answer in reason and "\n" not in reason and f"on {N} val images" in reason


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    space = {**TINY_SPACE, "base": {**TINY_SPACE.get("base", {}), "train": {"epochs": 1, "batch_size": 32}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space))
    write_image_folder(tmp_path / "images", n_per_class=16, n_val_per_class=8)  # vivid colours: 1.0 at once
    return tmp_path


def test_a_flat_study_stops_after_as_many_trials_again_and_says_why(workdir: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from catdog_hpo.search.run import run

    s = run_settings(workdir, trials=200, sampler="tpe", data=DataSource(path=str(workdir / "images")),
                     stop_when_flat=True)
    run(s)
    study = load_run_study(s)
    done = sorted((t for t in study.get_trials() if counts_toward_n(t)), key=lambda t: t.datetime_complete)
    values = [t.value for t in done]
    # one worker: the study ends at the first trial after which the rule says flat
    first = next(n for n in range(1, len(values) + 1) if flat(values[:n], 16) is not None)
    assert len(done) == first < 200, (len(done), values)
    err = capsys.readouterr().err
    assert "stopping: flat: the best val accuracy" in err and "on 16 val images" in err


def test_stop_when_flat_needs_one_objective(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    from catdog_hpo.cli import main

    assert main(["run", "--stop-when-flat", "--objectives", "accuracy,params", "--data", str(workdir / "images")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stop-when-flat with --objectives accuracy,params" in err[0] and "one objective" in err[0]
    assert not (workdir / "studies").exists()  # refused before any study was made
