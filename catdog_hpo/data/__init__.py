"""Images in, one uint8 tensor out: folders and built-in datasets, decoded once and cached.

Public API (the rest of the package uses only these):
  DataSource   where the images come from (a folder or a built-in name) and how to split them
  ImageSet     the decoded set: uint8 N x 3 x H x W tensors and int64 labels, train and val
  load_images  DataSource + image size -> ImageSet, through the on-disk cache

Inside (each module says more):
  types    DataSource and ImageSet themselves (below every other data module)
  folder   ImageFolder layouts (train/ + val/, or flat with a seeded stratified split), scan
  decode   Pillow decoding policy (EXIF, modes -> RGB, centre square, JPEG draft), thread pool
  cache    fingerprints, the atomic cache file, the lock that lets processes share it
  builtin  DATASETS: synthetic, cifar10-catdog, oxford-pets
  augment  batched augmentation and normalisation on the training device (no Python per image)
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The two types live in data/types.py, below every data module (folder and builtin build them
# too); they are re-exported here as the folder's public API.
from catdog_hpo.data.types import DataSource, ImageSet
from catdog_hpo.errors import UserError

if TYPE_CHECKING:
    from catdog_hpo.data.recipe import Recipe

__all__ = ["DataSource", "ImageSet", "load_images"]


def load_images(source: DataSource, image_size: int, cache_dir: Path) -> ImageSet:
    """Decode ``source`` at ``image_size`` x ``image_size`` px, or read it from ``cache_dir``.

    The first call decodes every image once (in parallel) and saves the set under
    ``cache_dir``; later calls with the same inputs (files, sizes, mtimes, split, size) read it
    back in a fraction of a second. Files that cannot be decoded are skipped and named in one
    warning (again on each load) and in ``ImageSet.skipped``. Bad layouts raise UserError.
    """
    from catdog_hpo.data import cache
    from catdog_hpo.data.folder import warn_skipped

    if image_size < 1:
        raise UserError(f"image size {image_size}: must be at least 1 pixel")
    recipe = _recipe(source)
    fp = cache.fingerprint(recipe.key, image_size)
    path = cache.cache_path(Path(cache_dir), recipe.origin, image_size, fp)
    images = _from_payload(cache.read(path, fp), fp)
    if images is None:
        images = _build_and_cache(recipe, image_size, fp, path)
    warn_skipped(recipe.origin, images.skipped, recipe.total_files)
    return images


def _recipe(source: DataSource) -> Recipe:
    """The folder's or the built-in dataset's recipe; UserError when the source names neither."""
    from catdog_hpo.data.builtin import DATASETS
    from catdog_hpo.data.folder import folder_recipe

    if (source.path is None) == (source.name is None):
        raise UserError("name the data: a folder (--data DIR) or a built-in dataset (--dataset NAME), not both")
    if not 0.0 < source.val_fraction < 1.0:
        raise UserError(f"val fraction {source.val_fraction}: must be between 0 and 1")
    if source.path is not None:
        return folder_recipe(source)
    if source.name not in DATASETS:
        raise UserError(f"unknown dataset {source.name!r} (choices: {', '.join(DATASETS)})")
    return DATASETS[source.name](source)


def _from_payload(data: dict[str, Any] | None, fp: str) -> ImageSet | None:
    if data is None:
        return None
    return ImageSet(
        data["train_x"], data["train_y"], data["val_x"], data["val_y"],
        classes=tuple(data["classes"]), fingerprint=fp, skipped=tuple(data["skipped"]),
    )


def _build_and_cache(recipe: Recipe, image_size: int, fp: str, path: Path) -> ImageSet:
    """Decode under the cache lock (so concurrent loaders decode once), then save atomically."""
    from catdog_hpo.data import cache

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"cannot create the image cache {path.parent} ({exc}); decoding without it", stacklevel=3)
        return dataclasses.replace(recipe.build(image_size), fingerprint=fp)
    with cache.locked(path):
        images = _from_payload(cache.read(path, fp), fp)  # another process may have built it meanwhile
        if images is not None:
            return images
        images = dataclasses.replace(recipe.build(image_size), fingerprint=fp)
        payload = {
            "fingerprint": fp, "origin": recipe.origin, "classes": list(images.classes),
            "skipped": list(images.skipped), "train_x": images.train_x, "train_y": images.train_y,
            "val_x": images.val_x, "val_y": images.val_y,
        }
        try:
            cache.write(path, payload)
        except OSError as exc:
            warnings.warn(f"cannot write the image cache {path} ({exc}); it will be decoded again", stacklevel=3)
    return images
