"""Device names -> torch devices, and GPUs handed out to parallel workers."""

from __future__ import annotations

import re

import torch

from catdog_hpo.errors import UserError

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def resolve_device(name: str) -> torch.device:
    """"auto" (the GPU when there is one), "cpu", "cuda" or "cuda:N" -> torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or _CUDA_INDEX.fullmatch(name):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
        match = _CUDA_INDEX.fullmatch(name)
        if match and int(match.group(1)) >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: there are {torch.cuda.device_count()} GPUs (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
        return torch.device(name)
    raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def parse_gpus(text: str | None, visible: int) -> list[int]:
    """"0,1" -> [0, 1]; None -> every visible GPU (none -> []). Bad or unknown ids -> UserError."""
    if text is None:
        return list(range(visible))
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UserError(f"--gpus {text!r}: {part!r} is not a GPU id (expected e.g. 0,1)")
        gpu = int(part)
        if gpu >= visible:
            have = f"GPUs 0 to {visible - 1}" if visible else "no GPUs"
            raise UserError(f"--gpus {text!r}: GPU {gpu} does not exist (this machine has {have})")
        if gpu in ids:
            raise UserError(f"--gpus {text!r}: GPU {gpu} is listed twice")
        ids.append(gpu)
    return ids


def assign_gpus(n_workers: int, gpus: list[int]) -> list[str]:
    """Worker i -> "cuda:<gpus[i % len(gpus)]>" (round-robin); no GPUs -> every worker on "cpu"."""
    if not gpus:
        return ["cpu"] * n_workers
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(n_workers)]
