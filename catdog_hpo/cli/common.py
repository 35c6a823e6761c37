"""Flags that several subcommands share, and their conversion to typed values."""

from __future__ import annotations

import argparse
from pathlib import Path

from catdog_hpo.errors import UserError

STUDIES_DIR = Path("studies")
DEFAULT_STORAGE = f"sqlite:///{STUDIES_DIR}/catdog.db"
DEFAULT_DATASET = "synthetic"


def add_data_args(p: argparse.ArgumentParser, default_dataset: str | None = DEFAULT_DATASET) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DIR", help="image folder: DIR/train/<class>/*, DIR/val/<class>/* or DIR/<class>/*")
    src.add_argument(
        "--dataset",
        metavar="NAME",
        help=f"built-in dataset: synthetic, cifar10-catdog, oxford-pets (default: {default_dataset})",
    )
    g.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="share of images held out for validation when DIR has no train/val split (default: 0.2)")
    g.add_argument("--split-seed", type=int, default=0, metavar="S", help="seed of that split (default: 0)")


def data_source(args: argparse.Namespace, default_dataset: str | None = DEFAULT_DATASET):  # -> DataSource
    """The DataSource the data flags name (``--data`` wins; else ``--dataset``; else the default)."""
    from catdog_hpo.data import DataSource

    if not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction}: must be between 0 and 1")
    if args.data is not None:
        return DataSource(path=str(Path(args.data)), val_fraction=args.val_fraction, split_seed=args.split_seed)
    name = args.dataset or default_dataset
    if name is None:
        raise UserError("name the data: --data DIR or --dataset NAME")
    return DataSource(name=name, val_fraction=args.val_fraction, split_seed=args.split_seed,
                      root=str(STUDIES_DIR / "datasets"))


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to train: auto = the GPU when there is one (default: auto)")


def add_storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URL",
                   help=f"study store: any URL Optuna takes, e.g. postgresql://user@host/db (default: {DEFAULT_STORAGE})")


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value
