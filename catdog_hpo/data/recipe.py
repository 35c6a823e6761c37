"""What a data source turns into before any pixel is decoded: a cache key and a builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from catdog_hpo.data.types import ImageSet


@dataclass(frozen=True)
class Recipe:
    """A data source made concrete: cheap to make (names and file stats), costly to ``build``."""

    origin: str  # what errors and warnings name: the folder, or "dataset:NAME"
    key: dict[str, Any]  # JSON-able description of every input the pixels depend on (the cache key)
    build: Callable[[int], ImageSet]  # image size (px) -> the decoded set, fingerprint left ""
    total_files: int  # images the source lists (for "skipped k of N")
