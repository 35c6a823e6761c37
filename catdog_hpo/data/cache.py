"""The on-disk cache of decoded image sets: one ``.pt`` file per fingerprint.

A fingerprint is the SHA-256 of a JSON description of everything the pixels depend on (for a
folder: each file's relative path, size and mtime_ns, the classes, the split settings; for a
built-in set: its name, sizes and seed) plus the image size and ``CACHE_VERSION``. Any change
gives a new file; the same inputs find the old one.

Processes share the cache safely: a writer saves to a unique temp file in the cache folder and
``os.replace``s it into place (readers see the old file, or the whole new one, never half), and
a file lock (``files.file_lock``) makes concurrent loaders of the same set wait
for the first to finish instead of all decoding it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from catdog_hpo.files import atomic_write, file_lock

# Bump when decoding or the file layout changes: old cache files are then simply not found.
CACHE_VERSION = 1

_TENSORS = ("train_x", "train_y", "val_x", "val_y")


def fingerprint(key: dict[str, Any], image_size: int) -> str:
    """Hex SHA-256 of the inputs' description, the image size (px) and the cache version."""
    blob = json.dumps({"v": CACHE_VERSION, "image_size": image_size, **key}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_path(cache_dir: Path, origin: str, image_size: int, fp: str) -> Path:
    """``<cache_dir>/<readable name>-<size>px-<fingerprint prefix>.pt``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(origin.replace(":", "-")).name or "data")[:40]
    return cache_dir / f"{slug}-{image_size}px-{fp[:16]}.pt"


def read(path: Path, fp: str) -> dict[str, Any] | None:
    """The cached payload at ``path`` if it is there, readable and for ``fp``; else None."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # unreadable or from an incompatible version: rebuild and overwrite it
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fp:
        return None
    if not all(isinstance(data.get(k), torch.Tensor) for k in _TENSORS):
        return None
    return data


def write(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` atomically (``files.atomic_write``: a temp file, then ``os.replace``)."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` while another process may build this set.

    Best effort: in a read-only cache folder it goes on unlocked (the write will warn)."""
    with file_lock(path.with_name(path.name + ".lock"), best_effort=True):
        yield
