"""Batched augmentation (catdog_hpo.engine.augment): shapes, devices, determinism, and that each
transform does what it says (flip mirrors, pad shifts by whole pixels, crops stay inside)."""

from __future__ import annotations

import itertools

import pytest
import torch

from catdog_hpo.config import AugmentConfig
from catdog_hpo.engine.augment import MEAN, STD, augment_batch, normalize_batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(b: int = 32, size: int = 16, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8).to(device)


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def test_normalize_batch_matches_the_formula() -> None:
    x = _images()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    out = normalize_batch(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "crop,flip,jitter", list(itertools.product(("none", "resized", "pad"), (False, True), (False, True)))
)
def test_shapes_dtypes_devices(device: str, crop: str, flip: bool, jitter: bool) -> None:
    x = _images(8, 20, device=device)
    out = augment_batch(x, AugmentConfig(crop=crop, flip=flip, color_jitter=jitter, strength=0.7), _gen(0, device))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("crop", ("none", "resized", "pad"))
def test_same_generator_seed_same_output_other_seed_differs(crop: str) -> None:
    x = _images()
    cfg = AugmentConfig(crop=crop, flip=True, color_jitter=True, strength=0.8)
    a = augment_batch(x, cfg, _gen(3))
    b = augment_batch(x, cfg, _gen(3))
    c = augment_batch(x, cfg, _gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_no_crop_no_flip_no_jitter_is_just_normalisation() -> None:
    x = _images()
    out = augment_batch(x, AugmentConfig(crop="none", flip=False, color_jitter=False, strength=1.0), _gen(0))
    assert torch.equal(out, normalize_batch(x))


def _is_plain_or_mirrored(out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (equals normalize(x), equals normalize(x) mirrored left-right)."""
    n = normalize_batch(x)
    plain = torch.isclose(out, n, atol=1e-5).flatten(1).all(1)
    mirrored = torch.isclose(out, n.flip(3), atol=1e-5).flatten(1).all(1)
    return plain, mirrored


def test_flip_mirrors_about_half_the_images() -> None:
    x = _images(64)
    out = augment_batch(x, AugmentConfig(crop="none", flip=True), _gen(0))
    plain, mirrored = _is_plain_or_mirrored(out, x)
    assert (plain | mirrored).all()  # every image is the original or its exact mirror
    assert 10 < int(mirrored.sum()) < 54  # both happen (p = 1/2 each, 64 draws)
    assert (out[mirrored][..., 0] == normalize_batch(x)[mirrored][..., -1]).all()  # first column = last


@pytest.mark.parametrize("crop", ("resized", "pad", "none"))
def test_strength_zero_is_only_the_flip(crop: str) -> None:
    x = _images(64)
    out = augment_batch(x, AugmentConfig(crop=crop, flip=True, color_jitter=True, strength=0.0), _gen(1))
    plain, mirrored = _is_plain_or_mirrored(out, x)
    assert (plain | mirrored).all()


def _gradient_images(b: int = 64, size: int = 16) -> torch.Tensor:
    """Smooth images (a horizontal ramp with a per-image offset) so a crop shows as a change."""
    ramp = torch.linspace(0, 200, size).view(1, 1, 1, size).expand(b, 3, size, size)
    offset = torch.arange(b).view(b, 1, 1, 1) % 50
    return (ramp + offset).round().to(torch.uint8).contiguous()


def test_resized_crop_changes_more_at_higher_strength() -> None:
    x = _gradient_images()
    base = normalize_batch(x)

    def change(strength: float) -> float:
        out = augment_batch(x, AugmentConfig(crop="resized", flip=False, strength=strength), _gen(0))
        return float((out - base).abs().mean())

    weak, strong = change(0.1), change(1.0)
    assert change(0.0) == 0.0
    assert strong > 2 * weak > 0


def test_resized_crop_samples_only_inside_the_image() -> None:
    x = torch.full((64, 3, 16, 16), 255, dtype=torch.uint8)  # a white image stays white under any crop
    out = augment_batch(x, AugmentConfig(crop="resized", flip=True, strength=1.0), _gen(0))
    torch.testing.assert_close(out, normalize_batch(x), rtol=1e-5, atol=1e-5)


def test_pad_crop_is_a_whole_pixel_shift_filled_with_the_mean() -> None:
    size, pad = 16, 2  # strength 1 at 16 px: shifts of up to 16 / 8 = 2 pixels
    x = _images(24, size)
    out = augment_batch(x, AugmentConfig(crop="pad", flip=True, strength=1.0), _gen(5))
    padded = torch.nn.functional.pad(normalize_batch(x), (pad, pad, pad, pad))  # zeros = mean colour
    shifts = set()
    for i in range(len(x)):
        matches = [
            (dx, dy, f)
            for dx, dy, f in itertools.product(range(-pad, pad + 1), range(-pad, pad + 1), (False, True))
            if torch.allclose(
                out[i], (padded[i].flip(2) if f else padded[i])[:, pad + dy : pad + dy + size, pad + dx : pad + dx + size],
                atol=1e-5,
            )
        ]
        assert matches, f"image {i} is not a shifted (and maybe mirrored) copy"
        shifts.add(matches[0][:2])
    assert len(shifts) > 3  # the shift really varies between images


def test_color_jitter_changes_colours_within_bounds() -> None:
    x = _gradient_images()
    n = normalize_batch(x)
    out = augment_batch(x, AugmentConfig(crop="none", flip=False, color_jitter=True, strength=1.0), _gen(0))
    assert not torch.allclose(out, n)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    unnorm = out * std + mean  # back to [0, 1]
    assert unnorm.min() >= -1e-5 and unnorm.max() <= 1 + 1e-5
    # brightness/contrast/saturation are within 1 +- 0.4: the image mean moves by well under 2x
    ratio = unnorm.mean((1, 2, 3)) / (x.float() / 255).mean((1, 2, 3))
    assert (ratio > 0.3).all() and (ratio < 2.0).all()
