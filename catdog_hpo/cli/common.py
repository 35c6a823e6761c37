"""Flags that several subcommands share, and their conversion to typed values."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from catdog_hpo.errors import UserError

STUDIES_DIR = Path("studies")
DEFAULT_STORAGE = f"sqlite:///{STUDIES_DIR}/catdog.db"
DEFAULT_DATASET = "synthetic"
STORAGE_ENV = "OPTUNA_STORAGE"  # the default store's environment variable, as Optuna's CLI reads


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


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N (checked against the GPUs later)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    return text


def add_device_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--device; ``what`` says what runs there for this command, e.g. "where each trial trains"."""
    p.add_argument("--device", default="auto", type=device_name, metavar="auto|cpu|cuda|cuda:N",
                   help=f"{what}: auto = the GPU when there is one, cuda:N = GPU N (default: auto)")


def add_deterministic_arg(p: argparse.ArgumentParser) -> None:
    """--deterministic (engine.runtime.configure_process): reproducible runs on CUDA too."""
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels and no cuDNN autotuning: the same seed gives the same "
                   "numbers on the same GPU and software (slower; CPU runs are reproducible anyway)")


def default_storage() -> str:
    """$OPTUNA_STORAGE when set (as Optuna's own CLI), else the SQLite file under studies/."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def add_storage_arg(p: argparse.ArgumentParser, what: str = "the study store") -> None:
    """--storage; ``what`` says what this command does with the store, e.g. "the store to list"."""
    p.add_argument("--storage", default=default_storage(), metavar="URL",
                   help=f"{what}: any URL Optuna takes (e.g. postgresql://user@host/db), a journal "
                   f"file for a shared filesystem (PATH.log or journal:///PATH), redis://HOST:PORT/DB, or "
                   f"grpc://HOST:PORT (a catdog-hpo storage-proxy) (default: ${STORAGE_ENV} "
                   f"if set, else {DEFAULT_STORAGE})")


def add_mlflow_args(p: argparse.ArgumentParser, what: str) -> None:
    """--mlflow URI and --no-mlflow (catdog_hpo.search.tracking); ``what`` says what is logged."""
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help=f"log to this MLflow tracking server or store: {what} (default: $MLFLOW_TRACKING_URI "
                   "when set; needs the [mlflow] extra; docs/tracking.md)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow even when $MLFLOW_TRACKING_URI is set")


def add_study_arg(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """--study NAME, also spelt --study-name as in Optuna's CLI."""
    p.add_argument("--study", "--study-name", dest="study", required=required, default=None,
                   metavar="NAME", help=help)


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value
