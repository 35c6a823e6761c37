"""How ``fit`` runs on its device: the explicit settings of the CUDA path, and process setup.

``Runtime`` holds every device-dependent choice of the training loop as a plain value (autocast
dtype, channels_last, fused optimizers, the static/graph-captured step, compile, cuDNN autotune),
so the CUDA branches can be run on the CPU in tests by passing them explicitly. ``for_device``
gives the defaults: the fast path on CUDA; on the CPU channels_last, and bf16 where it is native.

``configure_process`` is called once per process before training (CLI or worker): TF32 for fp32
matmuls on CUDA, determinism when asked, and for a worker sharing its GPU with others its memory
share (cap, per-trial buffers) and CPU thread pool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from catdog_hpo.config import TrainConfig
from catdog_hpo.engine.device import gpu_memory_share

# Values (floats) augmented at once: an epoch is augmented in chunks of this many values, so one
# batched augmentation covers many training batches (fewer kernel launches) at bounded memory.
AUG_CHUNK_VALUES_CUDA = 2**27  # 512 MiB of float32 per chunk: ~10.9k images at 64 px, ~2.7k at 128 px
AUG_CHUNK_VALUES_CPU = 2**24  # 64 MiB on the CPU, where launches cost nothing and memory is tighter
VAL_CHUNK_VALUES = 2**25  # input values per validation batch (128 MiB float32): 2730 images at 64 px
# The val set is kept normalised (float32) for the whole trial up to this many values (1 GiB:
# 5,000 images at 128 px); a larger one (224 px) stays uint8 and is normalised per val batch.
VAL_RESIDENT_VALUES = 2**28
CUDA_WORKER_THREADS = 2  # CPU threads of a CUDA worker that shares its GPU (it only launches kernels)
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic matmuls (CUDA docs)


def val_batch_size(n_val: int, values_per_image: int) -> int:
    """Images per validation batch: as many as VAL_CHUNK_VALUES holds (engine.train's batches;
    the cost model counts validation steps with it)."""
    return max(1, min(n_val, VAL_CHUNK_VALUES // max(1, values_per_image)))


@dataclass(frozen=True)
class Runtime:
    """Explicit engine settings; ``for_device`` picks them from the device and TrainConfig."""

    autocast: torch.dtype | None = None  # training forward under autocast in this dtype; eval is fp32
    channels_last: bool = False  # NHWC model and batches (cuDNN's and oneDNN's fastest convolutions)
    fused: bool = False  # fused Adam/AdamW/SGD kernels (CUDA and CPU both have them)
    static_step: bool = False  # the training step through static input buffers and a device lr
    cuda_graph: bool = False  # capture that static step in a CUDA graph (CUDA only)
    compile_backend: str | None = None  # torch.compile backend ("inductor", "eager"), None: off
    cudnn_benchmark: bool = False  # cuDNN autotuning: off, it re-tunes each trial's new shapes
    aug_chunk_values: int = AUG_CHUNK_VALUES_CPU
    # worker processes sharing this GPU: each trial's device buffers (the augmented chunk, the
    # resident normalised val set) get 1/K of their budget, as the worker gets 1/K of the memory
    gpu_workers: int = 1

    def __post_init__(self) -> None:
        assert not self.cuda_graph or self.static_step, "a CUDA graph captures the static step"
        assert self.aug_chunk_values > 0 and self.gpu_workers > 0


_deterministic = False  # set by configure_process; read by for_device
_gpu_workers = 1  # worker processes on this process's GPU; set by configure_process


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), so oneDNN's bf16 convolutions
    beat fp32 instead of emulating it (slower than fp32 on CPUs without it)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def for_device(device: torch.device, train: TrainConfig, cudnn_benchmark: bool = False) -> Runtime:
    """The defaults: on CUDA bf16 autocast (train.amp), channels_last, fused optimizers and the
    graph-captured step (train.compile instead switches to torch.compile). On the CPU
    channels_last, and bf16 autocast (train.amp) where the CPU has bf16 in hardware: oneDNN's
    NHWC convolutions and bf16 kernels, 1.9x faster epochs than fp32 NCHW on the 2-core
    AVX512-BF16 box at the same accuracy (bench/epoch.py); validation stays fp32 either way."""
    if device.type != "cuda":
        bf16 = train.amp and device.type == "cpu" and cpu_has_native_bf16()
        return Runtime(autocast=torch.bfloat16 if bf16 else None, channels_last=device.type == "cpu")
    compiled = "inductor" if train.compile else None
    return Runtime(
        autocast=torch.bfloat16 if train.amp else None, channels_last=True, fused=True,
        static_step=compiled is None, cuda_graph=compiled is None, compile_backend=compiled,
        cudnn_benchmark=cudnn_benchmark and not _deterministic, aug_chunk_values=AUG_CHUNK_VALUES_CUDA,
        gpu_workers=_gpu_workers,
    )


def apply_backends(rt: Runtime, device: torch.device) -> None:
    """Per-fit backend switches (process-wide in torch; every fit of a process sets them alike)."""
    _keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark and not _deterministic


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_KEEP = 2**28  # bytes (256 MiB): CPU activations below this are reused, not mapped anew
_allocator_tuned = False


def _keep_freed_memory() -> None:
    """Once per process, on glibc: serve large CPU tensors from the heap and keep freed memory.
    By default glibc's mmap threshold moves with the process's history, so in some processes
    every training step maps and unmaps its activations afresh (page faults on each step): the
    same epoch then ran 2.5-3.6x slower in one process than in the next (tests/test_budget.py's
    cost-model test, a batch-128 config, failed 5 of 12 runs that way; 0 of 8 with this)."""
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MALLOC_KEEP)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MALLOC_KEEP)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): its own allocator rules
        pass


def configure_process(device: str, *, deterministic: bool = False, workers_on_gpu: int = 1) -> None:
    """Once per process, before its first CUDA call. ``device`` is "cpu" or "cuda[:N]".

    TF32 for fp32 matmuls and convolutions on CUDA (about 8x the fp32 rate on tensor cores; fp32
    runs are those with amp off, and validation). ``deterministic``: deterministic kernels,
    no cuDNN autotuning, cuBLAS's fixed workspace; ops without a deterministic CUDA kernel warn.
    ``workers_on_gpu`` (K > 1: worker processes sharing this GPU): each may allocate 1/K of the
    GPU's memory (less headroom), its trials' buffers are divided by K (``for_device``), and it
    keeps a small CPU thread pool (it only launches kernels).
    """
    global _deterministic, _gpu_workers
    _deterministic = deterministic
    _gpu_workers = workers_on_gpu if device.startswith("cuda") else 1
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read at cuBLAS init
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))  # streams and graphs made without a device land here
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # == set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        share = gpu_memory_share(workers_on_gpu)
        if share is not None:
            # an allocation past it raises OOM in this worker; index None ("cuda"): the current GPU
            torch.cuda.set_per_process_memory_fraction(share, torch.device(device).index)
            torch.set_num_threads(CUDA_WORKER_THREADS)
