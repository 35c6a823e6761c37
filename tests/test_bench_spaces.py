"""The candidate spaces of bench/models.py (bench/spaces/*.yaml): each loads as a space file, its
baseline resolves, and random points of it resolve to configs whose models build (no training)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import FixedTrial

from catdog_hpo.config import TrialConfig, to_dict
from catdog_hpo.search.space_files import load_space
from catdog_hpo.search.spaces import resolve

SPACES = sorted((Path(__file__).resolve().parents[1] / "bench" / "spaces").glob("*.yaml"))


def test_the_candidate_spaces_are_there() -> None:
    assert {p.name for p in SPACES} >= {"photos-tricks.yaml", "cifar32.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_bench_space_loads_and_random_trials_resolve(path: Path) -> None:
    from catdog_hpo.engine.models import model_cost

    space = load_space(str(path))
    assert space.baseline is not None, f"{path.name}: a candidate space names its baseline trial"
    base = resolve(space, FixedTrial(space.baseline))
    model_cost(base.model, 2, base.image_size)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        cfg = resolve(space, trial)
        assert isinstance(cfg, TrialConfig)
        model_cost(cfg.model, 2, cfg.image_size)  # the model builds at its image size
        resolve(space, FixedTrial(trial.params))  # and the point replays, as export does
        study.tell(trial, 0.5)


def test_photos_tricks_baseline_is_the_default_spaces_baseline() -> None:
    """bench/spaces/photos-tricks.yaml adds the tricks to seed-cnn; its trial 0 is still the
    tutorial CNN, trained as the default space's trial 0 is (every trick off)."""
    tricks = load_space(str(next(p for p in SPACES if p.name == "photos-tricks.yaml")))
    seed = load_space("seed-cnn")
    assert to_dict(resolve(tricks, FixedTrial(tricks.baseline))) == to_dict(resolve(seed, FixedTrial(seed.baseline)))
