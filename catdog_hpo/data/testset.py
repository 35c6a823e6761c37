"""A labelled test folder (``retrain --test DIR``): DIR/<class>/* decoded as training decodes."""

from __future__ import annotations

from pathlib import Path

import torch

from catdog_hpo.errors import UserError


def load_test_set(folder: Path, classes: tuple[str, ...], image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 N x 3 x S x S images and labels from ``folder``/<class>/*, decoded as training
    decodes; the class folders must be the model's classes. Returns the skipped files too."""
    import numpy as np

    from catdog_hpo.data.decode import decode_files
    from catdog_hpo.data.folder import scan

    try:
        found, entries, is_split = scan(Path(folder))
    except UserError as exc:
        raise UserError(f"--test {folder}: {exc}") from None
    if is_split:
        raise UserError(f"--test {folder}: expected {folder}/<class>/<images>, found train/ and val/ folders")
    if sorted(found) != sorted(classes):
        raise UserError(f"--test {folder}: its classes ({', '.join(sorted(found))}) do not match the model's "
                        f"({', '.join(sorted(classes))})")
    to_model = [list(classes).index(name) for name in found]  # folder label -> the model's class index
    pixels, reasons = decode_files([Path(folder) / e.rel for e in entries], image_size)
    good = [i for i, r in enumerate(reasons) if r is None]
    skipped = [f"{entries[i].rel} ({r})" for i, r in enumerate(reasons) if r is not None]
    if not good:
        raise UserError(f"--test {folder}: none of its {len(entries)} images could be decoded")
    x = torch.from_numpy(np.ascontiguousarray(pixels[good].transpose(0, 3, 1, 2)))
    y = torch.tensor([to_model[entries[i].label] for i in good], dtype=torch.int64)
    return x, y, skipped
