"""Built-in datasets by name. ``DATASETS`` keys are the CLI's ``--dataset`` choices.

- ``synthetic``: discs of random size and place on noisy gradient backgrounds, filled with
  stripes (class "stripes") or a checkerboard ("checks") of random colours, period and
  rotation; generated in code (seeded by ``split_seed``) straight at the image size, no files.
  Colours and layout carry no class signal, only the texture does; noise, small discs and fine
  patterns keep it from being trivial (measured: the seed CNN without augmentation at 32 px
  reaches ~57% validation accuracy after 1 epoch, ~85% after 6).
- ``cifar10-catdog``: the cat (3) and dog (5) images of CIFAR-10 (32 px), labels 0=cat 1=dog;
  train and val both from data_batch_1..5 (val: ``val_fraction`` of each class, seeded by
  ``split_seed``, the same rule as a flat folder). The official test_batch is never searched on.
- ``oxford-pets``: Oxford-IIIT Pet, cat vs dog (its binary category); train and val both from
  trainval.txt (seeded, stratified, as above). The official test.txt is never searched on.
  Downloaded by torchvision on first use.

Validation is carved from the training split so that a study never selects on the test set.

Downloads go to ``DataSource.root``. Once the files are there they are read directly in
torchvision's on-disk format (without its md5 checks, so a copy placed there by hand works).

This module imports nothing heavy at the top: the CLI may import ``DATASETS`` for its choices.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from catdog_hpo.data.recipe import Recipe
from catdog_hpo.data.types import DataSource, ImageSet
from catdog_hpo.errors import UserError

if TYPE_CHECKING:
    import torch

    from catdog_hpo.data.folder import Entry

# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = ("stripes", "checks")
SYNTHETIC_TRAIN = 1000  # images; a 1-epoch CPU run of a small CNN at 32 px takes ~1-2 s
SYNTHETIC_VAL = 200
_SYNTHETIC_VERSION = 2  # bump when the generator changes (it is part of the cache key)
_CHUNK = 256  # images generated at once (bounds the float32 working memory)


def synthetic_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8 n x 3 x size x size) and labels (0 = stripes, 1 = checks), balanced."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2)[torch.randperm(n, generator=gen)]
    x = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        y = labels[start : start + _CHUNK]
        x[start : start + len(y)] = _draw_shapes(y, size, gen)
    return x, labels


def _draw_shapes(labels: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A disc of random size and place on a noisy two-colour gradient, filled with a two-colour
    pattern of random period and rotation: stripes (label 0) or a checkerboard (label 1)."""
    import torch

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) * (hi - lo) + lo

    b = len(labels)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in [0, 1]
    py, px = coords.view(1, size, 1), coords.view(1, 1, size)
    radius = u(b, lo=0.20, hi=0.40).view(b, 1, 1)  # fraction of the image side
    cx = (u(b) * (1 - 2 * radius.view(b)) + radius.view(b)).view(b, 1, 1)  # the disc stays inside
    cy = (u(b) * (1 - 2 * radius.view(b)) + radius.view(b)).view(b, 1, 1)
    dx, dy = px - cx, py - cy
    alpha = ((radius - torch.sqrt(dx * dx + dy * dy)) * size + 0.5).clamp(0, 1)  # antialiased edge

    angle = u(b, hi=math.pi).view(b, 1, 1)  # pattern rotation
    period = u(b, lo=0.12, hi=0.20).view(b, 1, 1)  # pattern period, fraction of the image side
    wave_a = torch.sin(2 * math.pi / period * (torch.cos(angle) * dx + torch.sin(angle) * dy))
    wave_c = torch.sin(2 * math.pi / period * (torch.cos(angle) * dy - torch.sin(angle) * dx))
    pattern = torch.where(labels.view(b, 1, 1).bool(), wave_a * wave_c, wave_a)
    pattern = (pattern * 3).clamp_(-1, 1) * 0.5 + 0.5  # sharpened towards two flat colours, 0..1

    phi = u(b, hi=2 * math.pi).view(b, 1, 1)  # background gradient direction
    t = ((px - 0.5) * torch.cos(phi) + (py - 0.5) * torch.sin(phi) + 0.71) / 1.42  # 0..1
    bg1, bg2, fg1 = (u(b, 3, 1, 1) for _ in range(3))  # random RGB colours
    fg2 = (fg1 + u(b, 3, 1, 1, lo=0.3, hi=0.7)) % 1.0  # differs from fg1 by >= 0.3 per channel
    img = torch.lerp(bg1, bg2, t.unsqueeze(1))
    img = torch.lerp(img, torch.lerp(fg1, fg2, pattern.unsqueeze(1)), alpha.unsqueeze(1))
    img.add_(torch.randn(img.shape, generator=gen), alpha=0.08)  # pixel noise, std 0.08 of full scale
    return img.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def synthetic_recipe(source: DataSource) -> Recipe:
    seed = source.split_seed
    key = {"kind": "builtin", "name": "synthetic", "version": _SYNTHETIC_VERSION,
           "n_train": SYNTHETIC_TRAIN, "n_val": SYNTHETIC_VAL, "seed": seed}

    def build(image_size: int) -> ImageSet:
        train_x, train_y = synthetic_images(SYNTHETIC_TRAIN, image_size, 2 * seed)
        val_x, val_y = synthetic_images(SYNTHETIC_VAL, image_size, 2 * seed + 1)
        return ImageSet(train_x, train_y, val_x, val_y, SYNTHETIC_CLASSES, fingerprint="")

    return Recipe("dataset:synthetic", key, build, SYNTHETIC_TRAIN + SYNTHETIC_VAL)


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_VAL_FILE = "test_batch"
_CIFAR_CAT, _CIFAR_DOG = 3, 5  # CIFAR-10 labels; ours are cat = 0, dog = 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _download_hint(what: str, root: Path, folder: str, exc: BaseException) -> UserError:
    return UserError(
        f"could not download {what} to {root}: {_one_line(exc)}; "
        f"put {folder} there (from a machine with internet) or pass --data DIR"
    )


def _ensure_cifar(root: Path) -> Path:
    """``root/cifar-10-batches-py`` with every batch file, downloading it if any is missing."""
    base = root / CIFAR_FOLDER
    needed = (*CIFAR_TRAIN_FILES, CIFAR_VAL_FILE)
    if all((base / f).is_file() for f in needed):
        return base
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)  # fetches and md5-checks the archive
    except Exception as exc:  # network, disk, checksum: all end the same way for the user
        raise _download_hint("CIFAR-10", root, CIFAR_FOLDER, exc) from None
    return base


# The only globals a CIFAR-10 python batch needs (numpy arrays; bytes from Python 3 pickles).
# Anything else in the file is refused: unpickling runs code, and the file comes from outside.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batches(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cat and dog images (uint8 N x 3 x 32 x 32) and labels from CIFAR-10 python batches."""
    import numpy as np
    import torch

    xs, ys = [], []
    for path in files:
        try:
            with open(path, "rb") as f:
                entry = _CifarUnpickler(f, encoding="latin1").load()  # the format torchvision reads
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(entry["labels"], dtype=np.int64)
        except Exception as exc:
            raise UserError(f"{path}: not a CIFAR-10 python batch ({_one_line(exc)})") from None
        keep = (labels == _CIFAR_CAT) | (labels == _CIFAR_DOG)
        xs.append(data[keep])
        ys.append((labels[keep] == _CIFAR_DOG).astype(np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x 3 x h x w -> uint8 N x 3 x size x size (antialiased bilinear), in chunks."""
    import torch
    import torch.nn.functional as F

    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = torch.empty(x.shape[0], 3, size, size, dtype=torch.uint8)
    for s in range(0, x.shape[0], 1024):
        chunk = F.interpolate(x[s : s + 1024].float(), size=(size, size), mode="bilinear",
                              antialias=True, align_corners=False)
        out[s : s + 1024] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def cifar10_catdog_recipe(source: DataSource) -> Recipe:
    root = Path(source.root)
    base = _ensure_cifar(root)
    files = [base / f for f in (*CIFAR_TRAIN_FILES, CIFAR_VAL_FILE)]
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    split = [source.val_fraction, source.split_seed]
    key = {"kind": "builtin", "name": "cifar10-catdog", "files": stats, "val_from_train": split}

    def build(image_size: int) -> ImageSet:
        import torch

        from catdog_hpo.data.folder import Entry, stratified_split

        x, y = _read_cifar_batches(files[:-1])  # data_batch_1..5 only: the test batch stays out
        for label, cls in enumerate(("cat", "dog")):
            if not bool((y == label).any()):
                raise UserError(f"{base}: the CIFAR-10 training batches hold no {cls} images")
        entries = [Entry(f"train:{i}", int(label), None) for i, label in enumerate(y.tolist())]
        is_val = torch.tensor(stratified_split(entries, ("cat", "dog"), source.val_fraction, source.split_seed,
                                               f"{base} (training batches)"))
        return ImageSet(resize_batch(x[~is_val], image_size), y[~is_val], resize_batch(x[is_val], image_size),
                        y[is_val], ("cat", "dog"), fingerprint="")

    return Recipe("dataset:cifar10-catdog", key, build, len(files))


# ----------------------------------------------------------------------------- Oxford-IIIT Pet

PETS_FOLDER = "oxford-iiit-pet"
PETS_SPLITS = ("trainval",)  # annotation files searched on (train and val); test.txt stays out


def _ensure_pets(root: Path) -> Path:
    """``root/oxford-iiit-pet`` with images/ and annotations/, downloading them if missing."""
    base = root / PETS_FOLDER
    if (base / "images").is_dir() and (base / "annotations").is_dir():
        return base
    try:
        from torchvision.datasets import OxfordIIITPet

        OxfordIIITPet(str(root), split="trainval", target_types="binary-category", download=True)
    except Exception as exc:
        raise _download_hint("Oxford-IIIT Pet", root, PETS_FOLDER, exc) from None
    return base


def _pets_entries(base: Path) -> list[Entry]:
    """Entries from annotations/{trainval,test}.txt: 'IMAGE-ID CLASS-ID SPECIES BREED-ID' lines,
    SPECIES 1 = cat, 2 = dog (torchvision's ``binary-category``); the image is images/ID.jpg."""
    from catdog_hpo.data.folder import Entry

    entries: list[Entry] = []
    for split in PETS_SPLITS:
        path = base / "annotations" / f"{split}.txt"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserError(f"{path}: cannot read the split file ({_one_line(exc)})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 4 or parts[2] not in ("1", "2"):
                raise UserError(f"{path}:{n}: expected 'IMAGE-ID CLASS-ID SPECIES(1|2) BREED-ID', got {line.strip()!r}")
            entries.append(Entry(f"images/{parts[0]}.jpg", int(parts[2]) - 1, None))  # side: the seeded split
    return entries


def oxford_pets_recipe(source: DataSource) -> Recipe:
    from catdog_hpo.data.folder import decode_entries, listing_key

    root = Path(source.root)
    base = _ensure_pets(root)
    entries = _pets_entries(base)
    classes = ("cat", "dog")
    origin = "dataset:oxford-pets"
    split = (source.val_fraction, source.split_seed)
    key = {"kind": "builtin", "name": "oxford-pets", "files": listing_key(base, entries), "val_from_train": list(split)}

    def build(image_size: int) -> ImageSet:
        return decode_entries(base, entries, classes, image_size, origin, split=split)

    return Recipe(origin, key, build, len(entries))


# ----------------------------------------------------------------------------- official test splits


def official_test_split(source: DataSource, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """The built-in dataset's official test split (uint8 images, labels, skipped files) for
    ``retrain`` to score once; None for the synthetic set and folders (which have none)."""
    import numpy as np
    import torch

    if source.name == "cifar10-catdog":
        base = _ensure_cifar(Path(source.root))
        x, y = _read_cifar_batches([base / CIFAR_VAL_FILE])
        return resize_batch(x, image_size), y, []
    if source.name != "oxford-pets":
        return None
    from catdog_hpo.data.decode import decode_files

    base = _ensure_pets(Path(source.root))
    path = base / "annotations" / "test.txt"
    try:
        lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as exc:
        raise UserError(f"{path}: cannot read the split file ({_one_line(exc)})") from None
    rows = [(f"images/{p[0]}.jpg", int(p[2]) - 1) for p in lines if len(p) == 4 and p[2] in ("1", "2")]
    pixels, reasons = decode_files([base / rel for rel, _ in rows], image_size)
    good = [i for i, r in enumerate(reasons) if r is None]
    skipped = [f"{rows[i][0]} ({r})" for i, r in enumerate(reasons) if r is not None]
    x = torch.from_numpy(np.ascontiguousarray(pixels[good].transpose(0, 3, 1, 2)))
    return x, torch.tensor([rows[i][1] for i in good], dtype=torch.int64), skipped


# ----------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[[DataSource], Recipe]] = {
    "synthetic": synthetic_recipe,
    "cifar10-catdog": cifar10_catdog_recipe,
    "oxford-pets": oxford_pets_recipe,
}
