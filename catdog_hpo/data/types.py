"""The data folder's two types, below every data module: where images come from, and what they become.

``catdog_hpo.data`` re-exports both (its public API); folder.py and builtin.py build ``ImageSet``s
from here, so the package and its modules do not import each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so DATASETS and DataSource stay light
    import torch


@dataclass(frozen=True)
class DataSource:
    path: str | None = None  # an image folder (ImageFolder layout), or
    name: str | None = None  # a built-in dataset (catdog_hpo.data.builtin.DATASETS key)
    val_fraction: float = 0.2  # held out when the folder has no train/val split
    split_seed: int = 0
    root: str = "studies/datasets"  # where built-in datasets download to / are read from

    def describe(self) -> str:
        return self.path if self.path is not None else f"dataset:{self.name}"


@dataclass
class ImageSet:
    train_x: torch.Tensor  # uint8, N x 3 x H x W
    train_y: torch.Tensor  # int64, N
    val_x: torch.Tensor  # uint8, M x 3 x H x W
    val_y: torch.Tensor  # int64, M
    classes: tuple[str, ...]
    fingerprint: str  # content hash of the inputs, the split and the size: the cache key
    skipped: tuple[str, ...] = field(default=())  # files that could not be decoded

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])
