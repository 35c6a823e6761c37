"""Decoded images for a worker's trials, kept on the training device: ``ImageProvider``."""

from __future__ import annotations

from pathlib import Path

import torch

from catdog_hpo.data import DataSource, ImageSet, load_images


class ImageProvider:
    """Decoded images, one ImageSet per image size, resident on the training device.

    Images are decoded once per study (the on-disk cache) and loaded once per worker process
    (this memo), so trials never decode.
    """

    def __init__(self, source: DataSource, cache_dir: Path, device: torch.device) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.device = device
        self._sets: dict[int, ImageSet] = {}

    def get(self, image_size: int) -> ImageSet:
        if image_size not in self._sets:
            images = load_images(self.source, image_size, self.cache_dir)
            # Keep the uint8 tensors on the device for every trial of this worker.
            images.train_x, images.train_y = images.train_x.to(self.device), images.train_y.to(self.device)
            images.val_x, images.val_y = images.val_x.to(self.device), images.val_y.to(self.device)
            self._sets[image_size] = images
        return self._sets[image_size]
