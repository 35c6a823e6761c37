"""Batched augmentation on the device: uint8 B x 3 x H x W in, float32 normalised out.

No per-image Python: every random draw is one tensor of B values from the caller's generator,
and every geometric transform (random resized crop, pad-and-crop, with the horizontal flip
folded in) is one ``F.grid_sample`` over the whole batch. Colour jitter (brightness,
contrast, saturation) runs on [0, 1] values before normalisation; normalisation uses the
ImageNet statistics so that pretrained ResNet weights see what they were trained on.

Output pixels that fall outside the source image (pad-and-crop) are zero *after*
normalisation, i.e. the dataset-mean colour, so padding carries no brightness signal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from catdog_hpo.config import AugmentConfig

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet channel means, [0, 1] scale
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet channel std devs, [0, 1] scale

# Random resized crop at strength 1 matches torchvision's defaults: area 8%..100%, aspect 3/4..4/3.
_MIN_AREA_AT_FULL = 0.08  # smallest crop area (fraction of the image) at strength 1
_LOG_ASPECT_AT_FULL = math.log(4.0 / 3.0)  # widest log aspect ratio at strength 1
_JITTER_AT_FULL = 0.4  # brightness/contrast/saturation factors in 1 +- 0.4 at strength 1
_PAD_DIVISOR = 8  # pad-and-crop shifts by up to strength * H / 8 pixels
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as PIL and torchvision use


_CONSTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, bias, luma) on ``device``, each 1 x 3 x 1 x 1; uint8 * scale + bias is
    (x/255 - mean) / std. Made once per device: building them from Python lists copies from
    the host, which on CUDA waits for the GPU, and the hot loop must not sync per step."""
    if device not in _CONSTS:
        scale, bias = _scale_bias(MEAN, STD)
        luma = torch.tensor(_GRAY, dtype=torch.float32).view(1, 3, 1, 1)
        _CONSTS[device] = (scale.to(device), bias.to(device), luma.to(device))
    return _CONSTS[device]


def _scale_bias(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), -mean / std) on the CPU, each 1 x 3 x 1 x 1: uint8 * scale + bias."""
    std_t = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)
    mean_t = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def normalize_batch(x: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W (any device) -> float32, ImageNet-normalised, same device and shape."""
    assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, tuple(x.shape))
    scale, bias, _ = _consts(x.device)
    # One multiply-add, the one normalisation: ``normalize`` (predict, the export checks) runs
    # this same expression, so exported models see bit-identical inputs.
    return torch.addcmul(bias, x.to(torch.float32), scale)


def normalize(x: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """``normalize_batch`` with a model's recorded mean and std (a checkpoint's, an ONNX file's):
    uint8 N x 3 x H x W -> float32 (x/255 - mean)/std, bit for bit as training computes it."""
    if tuple(mean) == tuple(MEAN) and tuple(std) == tuple(STD):
        return normalize_batch(x)
    assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, tuple(x.shape))
    scale, bias = _scale_bias(mean, std)
    return torch.addcmul(bias.to(x.device), x.to(torch.float32), scale.to(x.device))


def _uniform(gen: torch.Generator, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    """n floats uniform in [low, high) from ``gen`` (which must live on ``device``)."""
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _flip_signs(gen: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    """n values of +1 (keep) or -1 (mirror horizontally), each with probability 1/2."""
    return torch.where(torch.rand(n, generator=gen, device=device) < 0.5, -1.0, 1.0)


def _color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, then contrast, then saturation, each by a factor in 1 +- 0.4*strength; x in [0, 1]."""
    b, dev = x.shape[0], x.device
    a = _JITTER_AT_FULL * strength
    bright = _uniform(gen, b, 1 - a, 1 + a, dev).view(b, 1, 1, 1)
    contrast = _uniform(gen, b, 1 - a, 1 + a, dev).view(b, 1, 1, 1)
    sat = _uniform(gen, b, 1 - a, 1 + a, dev).view(b, 1, 1, 1)
    luma = _consts(dev)[2]
    x = (x * bright).clamp_(0, 1)
    mean_gray = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # per-image mean luma
    x = torch.lerp(mean_gray, x, contrast).clamp_(0, 1)  # contrast: blend with the mean grey
    gray = (x * luma).sum(1, keepdim=True)  # per-pixel luma
    return torch.lerp(gray, x, sat).clamp_(0, 1)  # saturation: blend with the greyscale image


# An axis-aligned affine map per image, output -> input in normalised [-1, 1] coordinates:
# x_in = sx * x_out + tx, y_in = sy * y_out + ty (sx < 0 mirrors). Each field is a B-vector.
_Affine = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (sx, tx, sy, ty)


def _resized_crop_params(b: int, strength: float, sign: torch.Tensor, gen: torch.Generator) -> _Affine:
    """Random resized crops: area uniform in [1 - 0.92*strength, 1] of the image, aspect ratio
    log-uniform in exp(+-strength*log(4/3)), a side longer than the image clipped to it, and
    the centre uniform over the positions that keep the crop inside the image."""
    dev = sign.device
    area = _uniform(gen, b, 1 - (1 - _MIN_AREA_AT_FULL) * strength, 1.0, dev)
    log_r = _uniform(gen, b, -_LOG_ASPECT_AT_FULL * strength, _LOG_ASPECT_AT_FULL * strength, dev)
    ratio = torch.exp(log_r)  # width / height
    w = torch.sqrt(area * ratio).clamp_(max=1.0)  # crop width as a fraction of the image width
    h = torch.sqrt(area / ratio).clamp_(max=1.0)
    cx = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - w)  # keeps |cx| + w <= 1
    cy = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - h)
    return w * sign, cx, h, cy  # a negative x scale mirrors the crop: the flip costs nothing extra


def _pad_crop_params(
    b: int, height: int, width: int, strength: float, sign: torch.Tensor, gen: torch.Generator
) -> _Affine:
    """Whole-pixel translations by up to round(strength*H/8) pixels each way: the same as
    padding by that much and cropping the original size back out at a random place."""
    dev = sign.device
    pad = round(strength * height / _PAD_DIVISOR)  # pixels
    dx = torch.randint(-pad, pad + 1, (b,), generator=gen, device=dev).float()
    dy = torch.randint(-pad, pad + 1, (b,), generator=gen, device=dev).float()
    return sign, 2 * dx / width, torch.ones(b, device=dev), 2 * dy / height  # 1 px = 2/W


def _resample(x: torch.Tensor, aff: _Affine, mode: str, padding: str) -> torch.Tensor:
    """``grid_sample`` over the batch with a grid built per axis (the maps have no rotation or
    shear, so this is several times cheaper than ``F.affine_grid``'s batched matmul)."""
    b, _, height, width = x.shape
    sx, tx, sy, ty = (t.view(b, 1, 1) for t in aff)
    xs = (torch.arange(width, device=x.device, dtype=torch.float32) * 2 + 1) / width - 1  # pixel centres
    ys = (torch.arange(height, device=x.device, dtype=torch.float32) * 2 + 1) / height - 1
    gx = (sx * xs.view(1, 1, width) + tx).expand(b, height, width)
    gy = (sy * ys.view(1, height, 1) + ty).expand(b, height, width)
    grid = torch.stack((gx, gy), dim=-1)  # B x H x W x 2, (x, y) as grid_sample wants
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """uint8 B x 3 x H x W on the device -> augmented float32 normalised B x 3 x H x W.

    ``gen`` must live on ``x.device``; the result is a pure function of ``x``, ``cfg`` and the
    generator's state. crop="resized" | "pad" | "none" (then only flip and jitter apply).
    """
    assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, tuple(x.shape))
    b, _, height, width = x.shape
    dev = x.device
    if cfg.color_jitter and cfg.strength > 0:
        scale, bias, _ = _consts(dev)
        out = _color_jitter(x.to(torch.float32) / 255.0, cfg.strength, gen)  # on [0, 1] values
        out = torch.addcmul(bias, out, scale * 255.0)  # then normalise
    else:
        out = normalize_batch(x)

    sign = _flip_signs(gen, b, dev) if cfg.flip else torch.ones(b, device=dev)
    if cfg.crop == "resized" and cfg.strength > 0:
        # the crop lies inside the image; "border" keeps edge samples from blending with padding
        return _resample(out, _resized_crop_params(b, cfg.strength, sign, gen), "bilinear", "border")
    if cfg.crop == "pad" and round(cfg.strength * height / _PAD_DIVISOR) > 0:
        # whole-pixel shifts: nearest copies pixels exactly; zeros == the mean colour (normalised)
        return _resample(out, _pad_crop_params(b, height, width, cfg.strength, sign, gen), "nearest", "zeros")
    if not cfg.flip:  # no geometric change at all
        return out
    return torch.where((sign < 0).view(b, 1, 1, 1), out.flip(3), out)  # an exact mirror, no resampling
