"""Image folders in ImageFolder layout -> a ``Recipe`` (what to decode, and its cache key).

Two layouts:
- split:  DIR/train/<class>/**  and  DIR/val/<class>/**   (both must name the same classes)
- flat:   DIR/<class>/**   held out per class by ``val_fraction`` (a stratified split)

Classes are the sorted folder names (two or more). Images are the files with an extension in
``IMAGE_EXTENSIONS`` (any case) anywhere under a class folder; hidden files and folders are
ignored. The flat split is decided per file by a seeded hash of its relative path, so it is
deterministic, stratified, and a file keeps its side when other files come or go.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catdog_hpo.data.decode import IMAGE_EXTENSIONS
from catdog_hpo.data.recipe import Recipe
from catdog_hpo.data.types import DataSource, ImageSet
from catdog_hpo.errors import UserError

_MAX_NAMED_SKIPS = 5  # files named in the skip warning; the rest are counted


@dataclass(frozen=True)
class Entry:
    """One image file: where it is (relative to the root), its class, and its side of the split."""

    rel: str  # POSIX-style path relative to the root, e.g. "train/cat/001.jpg"
    label: int
    val: bool | None  # True/False in the split layout; None until the flat split decides


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir())


def _image_files(class_dir: Path, root: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``class_dir`` (recursive, sorted)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden folders
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _classes_of(folder: Path) -> list[str]:
    classes = [p.name for p in _visible_dirs(folder)]
    if not classes:
        raise UserError(f"{folder}: no class folders; expected {folder}/<class>/<images>")
    if len(classes) < 2:
        raise UserError(f"{folder}: only one class folder ({classes[0]}); need at least two")
    return classes


def _class_entries(root: Path, sub: str, classes: Sequence[str], val: bool | None) -> list[Entry]:
    entries: list[Entry] = []
    for label, name in enumerate(classes):
        class_dir = root / sub / name if sub else root / name
        files = _image_files(class_dir, root)
        if not files:
            exts = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
            raise UserError(f"{class_dir}: no images ({exts})")
        entries.extend(Entry(rel, label, val) for rel in files)
    return entries


def scan(root: Path) -> tuple[tuple[str, ...], list[Entry], bool]:
    """(classes, entries, is_split_layout) of the folder ``root``; UserError on a bad layout."""
    if not root.exists():
        raise UserError(f"{root}: no such folder")
    if not root.is_dir():
        raise UserError(f"{root}: is a file; --data needs a folder of class folders")
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        missing = "val" if has_train else "train"
        raise UserError(f"{root}: has {'train' if has_train else 'val'}/ but no {missing}/ folder")
    if not has_train:
        classes = _classes_of(root)
        return tuple(classes), _class_entries(root, "", classes, None), False
    train_classes, val_classes = _classes_of(root / "train"), _classes_of(root / "val")
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise UserError(
            f"{root}: train/ and val/ have different classes "
            f"(only in train: {', '.join(only_t) or '-'}; only in val: {', '.join(only_v) or '-'})"
        )
    entries = _class_entries(root, "train", train_classes, False)
    entries += _class_entries(root, "val", val_classes, True)
    return tuple(train_classes), entries, True


def _stat_key(path: Path) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of ``path``; a broken link's own (lstat) values."""
    try:
        st = os.stat(path)
    except OSError:
        st = os.lstat(path)
    return st.st_size, st.st_mtime_ns


def listing_key(root: Path, entries: Sequence[Entry]) -> list[list[Any]]:
    """The cache-key part describing the files: [rel, label, val, size, mtime_ns] each."""
    return [[e.rel, e.label, e.val, *_stat_key(root / e.rel)] for e in entries]


def _split_rank(seed: int, rel: str) -> str:
    return hashlib.sha1(f"{seed}:{rel}".encode()).hexdigest()


def stratified_split(
    entries: Sequence[Entry], classes: Sequence[str], val_fraction: float, seed: int, origin: str
) -> list[bool]:
    """Per entry (in order), True when it goes to validation: per class, round(n * val_fraction)
    files (at least 1, at most n - 1) with the smallest seeded hash of their path."""
    is_val = [False] * len(entries)
    for label, name in enumerate(classes):
        mine = sorted((i for i, e in enumerate(entries) if e.label == label),
                      key=lambda i: _split_rank(seed, entries[i].rel))
        if len(mine) < 2:
            raise UserError(f"{origin}/{name}: {len(mine)} usable image(s); the split needs at least 2 per class")
        n_val = min(max(round(len(mine) * val_fraction), 1), len(mine) - 1)
        for i in mine[:n_val]:
            is_val[i] = True
    return is_val


def warn_skipped(origin: str, skipped: Sequence[str], total: int) -> None:
    """One warning naming (the first few of) the files that could not be decoded."""
    if not skipped:
        return
    named = ", ".join(skipped[:_MAX_NAMED_SKIPS])
    more = f", and {len(skipped) - _MAX_NAMED_SKIPS} more" if len(skipped) > _MAX_NAMED_SKIPS else ""
    warnings.warn(
        f"{origin}: skipped {len(skipped)} of {total} files that could not be decoded: {named}{more}",
        UserWarning,
        stacklevel=3,
    )


def decode_entries(
    root: Path,
    entries: Sequence[Entry],
    classes: tuple[str, ...],
    image_size: int,
    origin: str,
    split: tuple[float, int] | None = None,
) -> ImageSet:
    """Decode ``entries`` (paths relative to ``root``) into an ImageSet (fingerprint left empty).

    With ``split`` = (val_fraction, seed) the entries have no side yet: the stratified split is
    made over the files that decoded. Every class must keep at least one train and one val image.
    """
    import torch

    from catdog_hpo.data.decode import decode_files

    pixels, reasons = decode_files([root / e.rel for e in entries], image_size, channels_first=True)
    good = [i for i, r in enumerate(reasons) if r is None]
    skipped = tuple(f"{entries[i].rel} ({r})" for i, r in enumerate(reasons) if r is not None)
    if split is None:
        is_val = [bool(entries[i].val) for i in good]
    else:
        is_val = stratified_split([entries[i] for i in good], classes, split[0], split[1], origin)
    sides = {False: [i for i, v in zip(good, is_val) if not v], True: [i for i, v in zip(good, is_val) if v]}
    for val, idx in sides.items():
        present = {entries[i].label for i in idx}
        for label, name in enumerate(classes):
            if label not in present:
                where = f"{origin}/{'val' if val else 'train'}/{name}"
                raise UserError(f"{where}: no usable images (every file failed to decode)")

    def tensors(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(pixels[idx])  # N x 3 x H x W (the gather copies: contiguous)
        y = torch.tensor([entries[i].label for i in idx], dtype=torch.int64)
        return x, y

    train_x, train_y = tensors(sides[False])
    val_x, val_y = tensors(sides[True])
    return ImageSet(train_x, train_y, val_x, val_y, classes, fingerprint="", skipped=skipped)


def folder_recipe(source: DataSource) -> Recipe:
    """The recipe for ``source.path``: scan now (cheap: names and stats), decode on demand."""
    root = Path(source.path or "")
    origin = str(root)
    classes, entries, is_split = scan(root)
    key: dict[str, Any] = {"kind": "folder", "classes": list(classes), "files": listing_key(root, entries)}
    split = None if is_split else (source.val_fraction, source.split_seed)
    if split is not None:
        key["split"] = list(split)

    def build(image_size: int) -> ImageSet:
        return decode_entries(root, entries, classes, image_size, origin, split)

    return Recipe(origin=origin, key=key, build=build, total_files=len(entries))
