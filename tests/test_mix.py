"""mixup / cutmix (augment.mix, engine/mix.py): the config's boundary, what a mix does to a
chunk's images and targets, and fits that mix: seeded, resumed bit for bit, on the eager and the
static step, under bf16 autocast."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from catdog_hpo import config
from catdog_hpo.config import AugmentConfig, TrialConfig, from_dict
from catdog_hpo.data import ImageSet
from catdog_hpo.engine import heads, mix
from catdog_hpo.engine.mix import beta, mix_batch
from catdog_hpo.engine.runtime import Runtime
from catdog_hpo.engine.train import fit
from catdog_hpo.errors import ConfigError
from test_resume import config as resume_config, interrupted_then_resumed, learnable_set, timeless

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data() -> ImageSet:
    return learnable_set(n_train=96, n_val=32)


def mixing(m: str, alpha: float = 1.0, epochs: int = 3) -> TrialConfig:
    cfg = resume_config("adam", "cosine")
    return dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, mix=m, mix_alpha=alpha),
                               train=dataclasses.replace(cfg.train, epochs=epochs))


# --------------------------------------------------------------------------- the config


def test_the_registry_builds_every_declared_mix() -> None:
    assert set(mix.MIXES) == set(config.MIXES) and AugmentConfig().mix == "none"


@pytest.mark.parametrize("data_, message", [
    ({"mix": "blend"}, "augment.mix: 'blend' is not one of none, mixup, cutmix"),
    ({"mix_alpha": 0}, "augment.mix_alpha: 0.0 must be > 0"),
    ({"mix_alpha": -0.5}, "augment.mix_alpha: -0.5 must be > 0"),
])
def test_bad_mix_values_are_one_line_errors_naming_the_value(data_: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        from_dict(AugmentConfig, data_, where="augment")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- one chunk


def chunk(n: int = 8, side: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct random images, each its own class (so a soft target shows both shares)."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, side, side, generator=g), torch.arange(n)


def test_none_returns_the_chunk_untouched() -> None:
    x, y = chunk()
    out_x, out_y = mix_batch(x, y, 8, AugmentConfig(), torch.Generator().manual_seed(0))
    assert out_x is x and out_y is y


def test_mixup_blends_each_image_with_its_partner_by_its_targets_share() -> None:
    x, y = chunk()
    out_x, out_y = mix_batch(x, y, 8, AugmentConfig(mix="mixup", mix_alpha=0.4), torch.Generator().manual_seed(1))
    assert out_y.shape == (8, 8) and out_y.dtype == torch.float32
    torch.testing.assert_close(out_y.sum(1), torch.ones(8))
    lam = out_y[torch.arange(8), y]  # the own class's share; the rest is the partner's (i - 1)
    torch.testing.assert_close(out_y[torch.arange(8), y.roll(1)], 1 - lam)
    expected = lam.view(8, 1, 1, 1) * x + (1 - lam).view(8, 1, 1, 1) * x.roll(1, 0)
    torch.testing.assert_close(out_x, expected)
    assert 0 < float(lam.min()) and float(lam.max()) < 1


def test_cutmix_pastes_a_box_and_weighs_the_target_by_the_pixels_kept() -> None:
    x, y = chunk(n=16)
    out_x, out_y = mix_batch(x, y, 16, AugmentConfig(mix="cutmix"), torch.Generator().manual_seed(2))
    partner = x.roll(1, 0)
    own = (out_x == x).all(1)  # n x h x w: pixels of the image itself
    theirs = (out_x == partner).all(1)
    assert bool((own | theirs).all()), "every pixel is the image's or its partner's"
    kept = own.float().mean((1, 2))
    torch.testing.assert_close(out_y[torch.arange(16), y], kept)
    torch.testing.assert_close(out_y.sum(1), torch.ones(16))
    for i in range(16):  # the pasted pixels form one axis-aligned box
        rows, cols = theirs[i].any(1).nonzero(), theirs[i].any(0).nonzero()
        if len(rows):
            assert int(theirs[i].sum()) == len(rows) * len(cols)
            assert int(rows[-1] - rows[0]) + 1 == len(rows) and int(cols[-1] - cols[0]) + 1 == len(cols)
    assert 0 < float(kept.mean()) < 1


@pytest.mark.parametrize("m", ["mixup", "cutmix"])
def test_the_same_generator_state_gives_the_same_mix(m: str) -> None:
    x, y = chunk()
    cfg = AugmentConfig(mix=m)
    a = mix_batch(x, y, 8, cfg, torch.Generator().manual_seed(7))
    b = mix_batch(x, y, 8, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_beta_draws_from_the_given_generator_only_and_stays_finite_for_tiny_alpha() -> None:
    before = torch.get_rng_state()
    draws = beta(0.01, 20_000, torch.Generator().manual_seed(0), CPU)
    assert torch.equal(torch.get_rng_state(), before)  # dropout's stream is not touched
    assert bool(torch.isfinite(draws).all()) and float(draws.min()) >= 0 and float(draws.max()) <= 1
    mean = float(beta(2.0, 20_000, torch.Generator().manual_seed(0), CPU).mean())
    assert abs(mean - 0.5) < 0.01


def test_the_frozen_head_path_caches_one_feature_file_for_every_mix(data: ImageSet) -> None:
    base = mixing("none")
    keys = [heads.feature_key(dataclasses.replace(base, augment=dataclasses.replace(base.augment, mix=m)), data)
            for m in config.MIXES]
    assert keys[0] == keys[1] == keys[2]
    assert set(keys[0]["augment"]) == {"crop", "flip", "color_jitter", "strength"}


# --------------------------------------------------------------------------- fits that mix


@pytest.mark.parametrize("m", ["mixup", "cutmix"])
def test_a_mixing_fit_is_seeded_and_changes_training_only(data: ImageSet, m: str) -> None:
    a, b, plain = fit(mixing(m), data, CPU), fit(mixing(m), data, CPU), fit(mixing("none"), data, CPU)
    assert a.status == "completed" and timeless(a.history) == timeless(b.history)
    assert [h["train_loss"] for h in timeless(a.history)] != [h["train_loss"] for h in timeless(plain.history)]


@pytest.mark.parametrize("m, rt", [
    ("mixup", None),
    ("cutmix", Runtime(channels_last=True, static_step=True)),  # the CUDA path's static step, on the CPU
])
def test_a_resumed_mixing_fit_ends_with_the_uninterrupted_history(data: ImageSet, tmp_path: Path, m: str,
                                                                  rt: Runtime | None) -> None:
    cfg = mixing(m, alpha=0.4, epochs=4)
    whole = fit(cfg, data, CPU, runtime=rt)
    resumed, seen = interrupted_then_resumed(cfg, data, tmp_path / "state.pt", stop_after=2, runtime=rt)
    assert seen == [3, 4]
    assert timeless(resumed.history) == timeless(whole.history)


def test_soft_targets_train_under_bf16_autocast_with_label_smoothing_and_l1(data: ImageSet) -> None:
    cfg = mixing("cutmix", epochs=2)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, label_smoothing=0.1, l1=1e-5))
    result = fit(cfg, data, CPU, runtime=Runtime(autocast=torch.bfloat16, static_step=True))
    assert result.status == "completed" and len(result.history) == 2
