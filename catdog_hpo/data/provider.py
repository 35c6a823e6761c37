"""Decoded images for a worker's trials, kept on the training device: ``ImageProvider``."""

from __future__ import annotations

from pathlib import Path

import torch

from catdog_hpo.data import DataSource, ImageSet, load_images


class ImageProvider:
    """Decoded images, one ImageSet per image size, resident on the training device.

    Images are decoded once per study (the on-disk cache) and loaded once per worker process
    (this memo), so trials never decode. ``keep_on_device(n)``: only the n sizes used last stay
    on the device, the others wait in host memory (a worker sharing its GPU has 1/K of it).
    """

    def __init__(self, source: DataSource, cache_dir: Path, device: torch.device) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.device = device
        self._sets: dict[int, ImageSet] = {}
        self._resident: list[int] = []  # image sizes on the device, the one used last at the end
        self._keep: int | None = None  # sizes kept on the device at once (None: all)

    def keep_on_device(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"keep_on_device({n}): expected at least 1 image size")
        self._keep = n
        self._evict()

    def get(self, image_size: int) -> ImageSet:
        if image_size not in self._sets:
            self._sets[image_size] = load_images(self.source, image_size, self.cache_dir)
        images = self._sets[image_size]
        if image_size in self._resident:
            self._resident.remove(image_size)
        self._resident.append(image_size)
        # Keep the uint8 tensors on the device for every trial of this worker (no-ops when there).
        _move(images, self.device)
        self._evict()
        return images

    def resident_sizes(self) -> list[int]:
        """Image sizes whose images are on the device now, the one used last at the end."""
        return list(self._resident)

    def _evict(self) -> None:
        while self._keep is not None and len(self._resident) > self._keep:
            _move(self._sets[self._resident.pop(0)], torch.device("cpu"))


def _move(images: ImageSet, device: torch.device) -> None:
    images.train_x, images.train_y = images.train_x.to(device), images.train_y.to(device)
    images.val_x, images.val_y = images.val_x.to(device), images.val_y.to(device)
