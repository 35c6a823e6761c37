"""Device names -> torch devices, GPUs handed out to (and pinned in) workers, CUDA failures classified."""

from __future__ import annotations

import gc
import os
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


# --------------------------------------------------------------------------- worker pinning


def pin_worker_device(device: str, shared: bool, env: dict[str, str] | None = None) -> str:
    """Pin a fresh worker process to its GPU; call before its first CUDA call. Returns the device
    the worker then uses: "cuda:N" -> "cuda:0", the only GPU it sees ("cpu" stays "cpu").

    CUDA_VISIBLE_DEVICES is read when CUDA initialises, so the worker never opens a context on
    another GPU (a context costs ~500 MB). An id is looked up in the parent's own
    CUDA_VISIBLE_DEVICES when that is set. ``shared`` (several workers on one GPU): the caching
    allocator uses expandable segments, which fragment far less when processes share memory.
    """
    global _pinned_as
    own = env is None
    env = os.environ if env is None else env
    match = _CUDA_INDEX.fullmatch(device)
    if device == "cpu" or (match is None and device != "cuda"):
        return device
    index = int(match.group(1)) if match else 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(index + 1)]
    assert index < len(ids), (device, visible)
    env["CUDA_VISIBLE_DEVICES"] = ids[index]
    if shared and "PYTORCH_CUDA_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if own:
        _pinned_as = f"cuda:{index}"
    return "cuda:0"


_pinned_as: str | None = None  # the run's name for this process's GPU, once pinned


def device_label(device: torch.device) -> str:
    """The device as the run names it (what a trial records): a pinned worker's cuda:0 is the
    GPU it was given, e.g. cuda:3."""
    if device.type == "cuda" and _pinned_as is not None:
        return _pinned_as
    return str(device)


# --------------------------------------------------------------------------- CUDA failures

# Messages of allocation failures that are not torch.cuda.OutOfMemoryError: cuBLAS and cuDNN
# report them as RuntimeError (cuDNN's NOT_SUPPORTED is how a failed workspace allocation shows).
_OOM_MARKS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
              "CUDNN_STATUS_NOT_SUPPORTED", "CUDNN_STATUS_MAPPING_ERROR", "out of memory")
# Errors that leave the CUDA context unusable ("sticky"): every later call in the process fails.
_STICKY_MARKS = ("illegal memory access", "illegal instruction", "misaligned address",
                 "unspecified launch failure", "device-side assert", "CUBLAS_STATUS_EXECUTION_FAILED",
                 "CUDNN_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_INTERNAL_ERROR", "uncorrectable ECC",
                 "an illegal", "hardware stack error", "context is destroyed")
# CUDA errors of one config's launch that leave the context working: the same config fails the
# same way in any process, so a fresh worker would only die on it again.
_REPEATABLE_MARKS = ("invalid configuration argument", "no kernel image", "invalid device function",
                     "too many resources requested", "invalid argument", "operation not supported")


def classify_cuda_error(exc: BaseException) -> str | None:
    """"oom" (free memory, the next trial may fit), "sticky" (the process's CUDA context may be
    broken: confirm with ``cuda_context_works``, then restart the worker) or None (not a CUDA
    failure, or one of this config only). Follows ``__cause__`` and ``__context__``:
    torch.compile wraps errors raised while compiling."""
    seen: set[int] = set()
    kind: str | None = None
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        found = _classify_one(e)
        if found == "sticky":
            return found
        kind = kind or found
        e = e.__cause__ or e.__context__
    return kind


def _classify_one(e: BaseException) -> str | None:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "oom"
    text = str(e)
    accel = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: a CUDA runtime error
    if any(m in text for m in _STICKY_MARKS):
        return "sticky"
    if any(m in text for m in _OOM_MARKS):
        return "oom"
    if any(m in text for m in _REPEATABLE_MARKS):
        return None
    if accel is not None and isinstance(e, accel):
        return "sticky"  # an unknown CUDA runtime error: suspect the context, the probe decides
    return None


def cuda_context_works(device: torch.device) -> bool | None:
    """Whether this process's CUDA context still runs work on ``device``: one tiny allocation, a
    kernel, a synchronize (a sticky error is returned by every later synchronize). None where
    there is no context to probe (a CPU device, CUDA never initialised in this process)."""
    if device.type != "cuda" or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        x = torch.ones(1, device=device)  # may come from the cache without a driver call
        x.add_(1)  # a launch: fails at once on a broken context
        torch.cuda.synchronize(device)
        return bool(x.item() == 2.0)
    except Exception:  # noqa: BLE001 (any CUDA failure here means the context is gone)
        return False


def free_device_memory() -> None:
    """Collect garbage, then hand the CUDA caching allocator's free blocks back to the driver.
    Never after a sticky error: ``empty_cache`` itself raises then. A no-op without CUDA: the
    CPU allocator returns memory by itself, and a full collection costs ~0.1 s per trial."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()  # a failed trial's frames may hold device tensors in reference cycles
        torch.cuda.empty_cache()


# Share of a GPU's memory kept out of every worker's cap: each process's CUDA context (~0.5 GiB)
# and the allocator's fragmentation live outside what set_per_process_memory_fraction counts.
GPU_HEADROOM = 0.10


def gpu_memory_share(workers_on_gpu: int) -> float | None:
    """The fraction of its GPU's memory one of ``workers_on_gpu`` worker processes may allocate
    (torch.cuda.set_per_process_memory_fraction), or None for a worker alone on its GPU (no cap).
    An equal share each: one worker's large trial then fails in that worker (OOM, a fact of the
    config at this share) instead of in a neighbour's trial, which would teach the sampler a lie."""
    if workers_on_gpu < 1:
        raise ValueError(f"workers_on_gpu={workers_on_gpu}: expected at least 1")
    if workers_on_gpu == 1:
        return None
    return (1.0 - GPU_HEADROOM) / workers_on_gpu
