"""Decode image files with Pillow into one uint8 N x S x S x 3 array, in parallel threads.

Policy (one place, so every loader and the cache agree):
- EXIF orientation is applied (``ImageOps.exif_transpose``).
- Every mode becomes RGB: transparency (RGBA, LA, PA, P with a transparent colour) is
  composited on white; CMYK, YCbCr, L, 1, ... are converted by Pillow; 16- and 32-bit
  greyscale (I;16*, I, F) is scaled from its 0..65535 range down to 0..255.
- Resize: the shorter side is scaled to S and the centre S x S square is kept (no distortion;
  the standard Resize + CenterCrop of torchvision), with Pillow's antialiased bilinear filter.
  JPEGs are first decoded at a reduced scale (``Image.draft``), which makes big photos cheap.
- A file that cannot be decoded is not an exception: ``decode_files`` reports a short reason.
  Pillow's decompression-bomb *warning* (more than ~89 M pixels) is silenced, so a valid
  10,000 x 10,000 image loads; its *error* (more than ~179 M pixels) skips the file.

Threads, not processes: Pillow releases the GIL while decoding and resizing, and the workers
write straight into the shared output array (no pickling of pixels between processes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions that count as images (compared lower-case); anything else in a class folder is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

_WHITE = (255, 255, 255)
_REDUCE_GAP = 3  # reduce() down to >= 3x the target size, then the bilinear filter finishes (as Pillow's reducing_gap)
_MAX_REDUCE = 128  # reduce() factors far above this drift a few grey levels (seen at 416 in Pillow 13)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the policy)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit greyscale
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        gray = np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image file -> uint8 ``size`` x ``size`` x 3 (RGB). Raises whatever Pillow raises."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale, still >= size px
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        w, h = img.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)  # centre square
        factor = min(side // (size * _REDUCE_GAP), _MAX_REDUCE)
        if factor >= 2:  # a big image: box-average by an integer factor first (fast), cropping as it goes
            img, box = img.reduce(factor, box=box), None
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)  # antialiased for downscales
        return np.asarray(img, dtype=np.uint8)


def skip_reason(path: Path, exc: BaseException) -> str:
    """A few words saying why ``path`` could not be decoded (for the one summary warning)."""
    if isinstance(exc, FileNotFoundError):
        return "missing file (broken link?)" if os.path.islink(path) else "missing file"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(exc, Image.DecompressionBombError):
        return "too large: over Pillow's decompression-bomb limit"
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
    except OSError:
        pass
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "truncated" in text.lower():
        return "truncated"
    return f"cannot decode: {text[:80]}"


def default_workers() -> int:
    """Decoding threads: one per CPU core (capped; more gives nothing past the disk)."""
    return max(1, min(32, os.cpu_count() or 1))


def decode_files(
    paths: Sequence[Path], size: int, workers: int | None = None, channels_first: bool = False
) -> tuple[np.ndarray, list[str | None]]:
    """Decode ``paths`` into uint8 N x size x size x 3 (or N x 3 x size x size with
    ``channels_first``, written in place, which saves a full copy of the set) with a thread pool.

    Returns the array and, per file, None when it decoded or the reason it did not (its row
    is then left zero). Warnings Pillow raises on the way (decompression-bomb, EXIF, palette
    transparency) are silenced here: the caller reports skipped files in one warning of its own.
    """
    shape = (len(paths), 3, size, size) if channels_first else (len(paths), size, size, 3)
    out = np.zeros(shape, dtype=np.uint8)
    reasons: list[str | None] = [None] * len(paths)

    def work(i: int) -> None:
        try:
            pixels = decode_image(paths[i], size)
            out[i] = pixels.transpose(2, 0, 1) if channels_first else pixels
        except Exception as exc:  # any failure of any codec means "skip this file"
            reasons[i] = skip_reason(paths[i], exc)

    n_workers = min(workers or default_workers(), max(1, len(paths)))
    # catch_warnings is process-global state: it covers the worker threads while they run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        if n_workers == 1:
            for i in range(len(paths)):
                work(i)
        else:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="decode") as pool:
                list(pool.map(work, range(len(paths))))
    return out, reasons
