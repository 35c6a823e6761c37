"""Names the shipping commands accept, importable without torch (the CLI builds its parser from
them and ``--help`` stays instant)."""

from __future__ import annotations

# retrain --train-on: "train" keeps the best epoch by val accuracy; "train+val" trains on both
# and keeps the final epoch (the val accuracy is then not held out).
TRAIN_ON = ("train", "train+val")
