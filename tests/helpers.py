"""Shared test utilities: tiny image folders written with Pillow, bad files, fake built-in sets.

Every writer is deterministic (seeded) and small (8-32 px), so tests stay fast.

- ``write_image_folder``: a learnable ImageFolder tree (each class has its own hue and stripe
  direction; noise and brightness vary), in the split (train/ + val/) or flat layout.
- ``write_*``: one file each of the awkward kinds the loader must survive (corrupt, truncated,
  empty, not an image, RGBA, greyscale, CMYK, 16-bit, huge, decompression bomb, broken link,
  EXIF-rotated).
- ``write_fake_cifar`` / ``write_fake_pets``: a few images in the exact on-disk formats
  torchvision reads for CIFAR-10 and Oxford-IIIT Pet.
- ``kaggle_path``: the shared 3,000-photo folder, or None when absent.
- ``Proc``: a CLI process whose stdout and stderr go to files, and its ``finish``.
"""

from __future__ import annotations

import colorsys
import io
import os
import pickle
import struct
import subprocess
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def kaggle_path() -> Path | None:
    """/work/shared/data/catdog-kaggle-3k (or $CATDOG_KAGGLE) if it is there, else None."""
    env = os.environ.get("CATDOG_KAGGLE")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/catdog-kaggle-3k"
    return path if (path / "train").is_dir() else None


# ----------------------------------------------------------------------------- good images


def class_pixels(label: int, n_classes: int, size: int, rng: np.random.Generator,
                 saturation: float = 0.8) -> np.ndarray:
    """uint8 size x size x 3: the hue of class ``label`` with stripes in its own direction.

    Colour alone separates the classes (a tiny model learns it in an epoch); stripes give a
    second, spatial cue. Brightness, stripe phase and pixel noise vary per image. A low
    ``saturation`` (0.8: vivid) leaves the hue a faint cue, so a few steps learn it only partly."""
    r, g, b = colorsys.hsv_to_rgb(label / n_classes, saturation, 0.9)
    base = np.array([r, g, b], dtype=np.float32) * rng.uniform(0.75, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    direction = (xx, yy, xx + yy, xx - yy)[label % 4]  # vertical, horizontal, diagonal stripes
    stripes = 0.5 + 0.5 * np.sin(direction * (2 * np.pi / 4) + rng.uniform(0, 2 * np.pi))
    img = base[None, None, :] * (0.7 + 0.3 * stripes[..., None])
    img += rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write_pixels(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)  # format from the extension


def write_class_dir(
    folder: Path, label: int, n_classes: int, n: int, size: int, rng: np.random.Generator, ext: str = "png",
    saturation: float = 0.8,
) -> list[Path]:
    """``n`` images of class ``label`` as ``folder``/000.<ext>, 001.<ext>, ... (class_pixels)"""
    paths = [folder / f"{i:03d}.{ext}" for i in range(n)]
    for p in paths:
        _write_pixels(p, class_pixels(label, n_classes, size, rng, saturation))
    return paths


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("cat", "dog"),
    n_per_class: int = 8,
    size: int = 16,
    split: bool = True,
    seed: int = 0,
    ext: str = "png",
    n_val_per_class: int | None = None,
    saturation: float = 0.8,
) -> Path:
    """A learnable image folder at ``root``; returns ``root``.

    split=True: root/train/<class>/ with ``n_per_class`` images each and root/val/<class>/
    with ``n_val_per_class`` (default: half as many, at least 2). split=False: root/<class>/
    with ``n_per_class`` each. ``ext`` "png" is lossless (exact pixels); "jpg" works too.
    ``saturation``: how vivid the class colours are (class_pixels).
    """
    rng = np.random.default_rng(seed)
    n_val = n_val_per_class if n_val_per_class is not None else max(2, n_per_class // 2)
    for label, name in enumerate(classes):
        if split:
            write_class_dir(root / "train" / name, label, len(classes), n_per_class, size, rng, ext, saturation)
            write_class_dir(root / "val" / name, label, len(classes), n_val, size, rng, ext, saturation)
        else:
            write_class_dir(root / name, label, len(classes), n_per_class, size, rng, ext, saturation)
    return root


# ----------------------------------------------------------------------------- awkward files


def jpeg_bytes(size: int = 16, seed: int = 0, mode: str = "RGB") -> bytes:
    """A valid JPEG of random pixels (noise compresses badly, so the file has real content)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_corrupt_jpeg(path: Path) -> Path:
    """A JPEG whose headers are fine but whose scan data is a run of bogus markers."""
    data = jpeg_bytes(32)
    sos = data.index(b"\xff\xda")  # start of scan
    return _write_bytes(path, data[: sos + 20] + b"\xff\xd8" * 100 + b"\xff\xd9")


def write_truncated_jpeg(path: Path) -> Path:
    """The first half of a valid JPEG."""
    data = jpeg_bytes(32)
    return _write_bytes(path, data[: len(data) // 2])


def write_empty_file(path: Path) -> Path:
    return _write_bytes(path, b"")


def write_not_an_image(path: Path) -> Path:
    """Text behind an image extension."""
    return _write_bytes(path, b"this is not an image, whatever its name says\n" * 4)


def write_rgba_png(path: Path, size: int = 16, alpha: int = 0, rgb: tuple[int, int, int] = (255, 0, 0)) -> Path:
    """A solid-colour PNG with uniform alpha (0 = fully transparent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (size, size), (*rgb, alpha)).save(path)
    return path


def write_gray(path: Path, size: int = 16, value: int = 128) -> Path:
    """A greyscale (mode L) image; format from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)
    return path


def write_cmyk_jpeg(path: Path, size: int = 16, cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> Path:
    """A CMYK JPEG (default: pure red ink-wise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (size, size), cmyk).save(path, "JPEG", quality=95)
    return path


def write_16bit_png(path: Path, size: int = 16, value: int = 65535) -> Path:
    """A 16-bit greyscale PNG (Pillow opens it as mode I;16 or I)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(path)
    return path


def write_palette_png(path: Path, size: int = 16) -> Path:
    """A palette (P) PNG with a transparent colour: the left half transparent, the right blue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("P", (size, size), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (size // 2, 0, size, size))
    img.save(path, transparency=0)
    return path


def write_huge_png(path: Path, width: int = 10_000, height: int = 10_000, value: int = 200) -> Path:
    """A valid solid greyscale PNG of width x height pixels: tiny on disk (it compresses)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (width, height), value).save(path, compress_level=1)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG whose header claims side x side pixels (400 M by default: over Pillow's
    decompression-bomb error limit) with no pixel data behind it: a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    return _write_bytes(path, data)


def write_broken_symlink(path: Path) -> Path:
    """A symlink to a file that does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(path.parent / "does-not-exist.jpg", path)
    return path


def write_exif_rotated_jpeg(path: Path, width: int = 32, height: int = 16, orientation: int = 6) -> Path:
    """A JPEG stored width x height, left half red and right half blue, whose EXIF says to
    rotate it (6 = 90 degrees clockwise on display: shown height x width, red on top)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (width, height), (255, 0, 0))
    img.paste((0, 0, 255), (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation tag
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


# ----------------------------------------------------------------------------- fake built-ins


def write_fake_cifar(root: Path, per_batch: int = 10, seed: int = 0) -> Path:
    """``root``/cifar-10-batches-py in CIFAR-10's python format (pickled dicts with "data":
    uint8 N x 3072 and "labels"), ``per_batch`` images per batch, labels cycling 0..9 so each
    batch holds cats (3) and dogs (5). Image pixels are ``label * 20`` everywhere, so a test
    can tell which image went where. Returns the batches folder."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        labels = [(i + k) % 10 for i in range(per_batch)]
        data = np.stack([np.full(3072, lab * 20, dtype=np.uint8) for lab in labels])
        data[:, 0] = rng.integers(0, 256, per_batch)  # one varying pixel per image: not all identical
        entry = {"batch_label": name, "labels": labels, "data": data,
                 "filenames": [f"img_{k}_{i}.png" for i in range(per_batch)]}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": per_batch, "num_vis": 3072}
    with open(base / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return base


def write_fake_pets(root: Path, n_trainval: int = 8, n_test: int = 4, size: int = 24, seed: int = 0) -> Path:
    """``root``/oxford-iiit-pet with images/*.jpg and annotations/{trainval,test}.txt in the
    dataset's format ("Breed_N CLASS-ID SPECIES BREED-ID"; species 1 = cat, 2 = dog),
    alternating cats and dogs. Returns the oxford-iiit-pet folder."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    breeds = [("Abyssinian", 1, 1, 1), ("beagle", 2, 2, 1)]  # (name, class id, species, breed id)
    counter = 0
    for split, n in (("trainval", n_trainval), ("test", n_test)):
        lines = []
        for i in range(n):
            name, class_id, species, breed_id = breeds[i % 2]
            counter += 1
            image_id = f"{name}_{counter}"
            Image.fromarray(class_pixels(species - 1, 2, size, rng)).save(base / "images" / f"{image_id}.jpg", quality=95)
            lines.append(f"{image_id} {class_id} {species} {breed_id}")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return base


# A search space whose trials take well under a second on a CPU: 16 px, one or two small
# blocks, one epoch; its grid has 6 points (depth 1 or 2 at 8 channels x 3 learning rates).
TINY_SPACE: dict = {
    "name": "tiny",
    "base": {"image_size": 16, "model": {"family": "cnn", "head": "gap", "dropout": 0.0},
             "optim": {"name": "adam", "scheduler": "none"}, "train": {"epochs": 1, "batch_size": 128}},
    "blocks": {"depth": {"int": [1, 2]}, "channels": {"choices": [8, 16], "grid": [8]}},
    "params": {"optim.lr": {"float": [1e-3, 3e-2], "log": True, "grid": [3e-3, 1e-2, 3e-2]}},
}


@dataclass
class Proc:
    """A ``catdog-hpo`` process started by a test, its stdout and stderr going to files."""

    popen: subprocess.Popen
    out: Path
    err: Path
    wait_s: float  # seconds ``finish`` waits for the exit by default

    def finish(self, timeout: float | None = None) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once the process has exited."""
        code = self.popen.wait(timeout=self.wait_s if timeout is None else timeout)
        return code, self.out.read_text(), self.err.read_text()


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    """What a CLI call printed on stderr: exactly one line, no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()
