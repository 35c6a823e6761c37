"""Image size as a searched parameter of a scratch space (issue 23): a cnn or resnet space can
search ``image_size``, the cost model prices each config at its size, and a study decodes each
size once and runs trials at several sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from catdog_hpo.data import provider
from catdog_hpo.engine.cost import Calibration, workload
from catdog_hpo.engine.models import model_cost
from catdog_hpo.search.record import TrialKey
from catdog_hpo.search.space_files import load_space
from catdog_hpo.search.spaces import resolve
from catdog_hpo.search.run import run
from study_factory import load_run_study, run_settings

SIZES = (32, 48, 64, 96)  # px
RATES = Calibration(flop_rate=2e10, step_s=2e-4, act_s=1e-9)  # any positive rates: only the order matters


def scratch_space(path: Path, builtin: str) -> Path:
    """The built-in scratch space ``builtin`` with image_size searched over SIZES."""
    data = yaml.safe_load(Path(load_space(builtin).source).read_text())
    data["params"] = {"image_size": {"choices": list(SIZES), "grid": [32, 96]}, **data["params"]}
    data["baseline"] = {**data["baseline"], "image_size": 64}
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # params in order: a condition follows its parameter
    return path


@pytest.mark.parametrize("builtin", ["seed-cnn", "resnet-scratch"])
def test_a_scratch_space_searches_image_size_and_its_cost_grows_with_it(tmp_path: Path, builtin: str) -> None:
    space = load_space(str(scratch_space(tmp_path / "sized.yaml", builtin)))
    flops, seconds = [], []
    for size in SIZES:
        cfg = resolve(space, optuna.trial.FixedTrial({**space.baseline, "image_size": size}))
        assert cfg.image_size == size
        cost = model_cost(cfg.model, 2, size)
        w = workload(cfg, cost.flops, cost.params, 2, n_train=2000, n_val=1000)
        flops.append(w.flops)
        seconds.append(RATES.predict(w))
    assert flops == sorted(flops) and len(set(flops)) == len(SIZES), flops
    assert seconds == sorted(seconds) and len(set(seconds)) == len(SIZES), seconds
    # a conv net's work scales with the pixels: 96 px is (96/32)^2 = 9x the pixels of 32 px
    assert flops[-1] > 5 * flops[0]


def test_a_study_searching_image_size_decodes_each_size_once_and_prices_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    space = {
        "name": "sized",
        "base": {"image_size": 16, "model": {"family": "cnn", "head": "gap", "dropout": 0.0},
                 "optim": {"name": "adam", "scheduler": "none"}, "train": {"epochs": 1, "batch_size": 128}},
        "blocks": {"depth": 1, "channels": 8},
        "params": {"image_size": {"choices": [16, 24]}, "optim.lr": {"choices": [3e-3, 1e-2]}},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space))
    decoded: Counter[int] = Counter()
    real_load = provider.load_images

    def counting_load(source, image_size, cache_dir):  # type: ignore[no-untyped-def]
        decoded[image_size] += 1
        return real_load(source, image_size, cache_dir)

    monkeypatch.setattr(provider, "load_images", counting_load)
    s = run_settings(tmp_path, sampler="grid", trials=4, baseline=False)
    assert run(s) == 0
    trials = load_run_study(s).get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["image_size"] for t in trials) == [16, 16, 24, 24]
    assert decoded == {16: 1, 24: 1}  # one load per size for the whole study
    by = {(t.params["image_size"], t.params["optim.lr"]): t.user_attrs for t in trials}
    for lr in (3e-3, 1e-2):
        small, big = by[16, lr], by[24, lr]
        assert small[TrialKey.CONFIG]["image_size"] == 16 and big[TrialKey.CONFIG]["image_size"] == 24
        assert big[TrialKey.FLOPS] > small[TrialKey.FLOPS]
        assert big[TrialKey.PREDICTED_EPOCH_S] > small[TrialKey.PREDICTED_EPOCH_S]
