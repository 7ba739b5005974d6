"""What a device error means for a render: out of memory (retry smaller), a broken device
(stop the run), or neither (the batch failed).

cuBLAS / cuDNN report failed allocations as plain `RuntimeError`s ("CUBLAS_STATUS_ALLOC_FAILED");
they are out of memory as surely as `torch.OutOfMemoryError`. Some CUDA errors are sticky: after
an illegal memory access or a device-side assert the CUDA context is unusable, and every later
call fails the same way, so rendering on would mark a whole night failed in minutes.

The retry after an out-of-memory error must happen *outside* the `except` block: while the
block runs, the traceback keeps the failed call's activations alive and `empty_cache()` frees
nothing. `free_device_memory()` is for after the block.
"""

from __future__ import annotations

from ..errors import ImagegenError

# Substrings of RuntimeError messages (matched case-insensitively).
OOM_MARKERS = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cufft_alloc_failed",
    "cusolver_status_alloc_failed",
    "hipblas_status_alloc_failed",
)
STICKY_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc error",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cuda error: unknown error",
    "gpu has fallen off the bus",
    "cuda driver version is insufficient",
    "no cuda gpus are available",
)


class EngineOOM(ImagegenError):
    """The device ran out of memory during `generate`; the caller may retry with a smaller batch."""


class EngineDeviceError(ImagegenError):
    """The device is in a state where nothing more can run on it (a sticky CUDA error): stop,
    the jobs stay pending for the next run."""


def classify(exc: BaseException) -> str | None:
    """"oom", "sticky" or None (an ordinary error) for an exception raised by torch."""
    if isinstance(exc, ImagegenError):
        return None
    oom_type = _oom_type()
    if oom_type is not None and isinstance(exc, oom_type):
        return "oom"
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    if any(m in text for m in STICKY_MARKERS):
        return "sticky"
    if any(m in text for m in OOM_MARKERS):
        return "oom"
    return None


def _oom_type() -> type | None:
    import sys

    torch = sys.modules.get("torch")  # an OutOfMemoryError can only come from a loaded torch
    return getattr(torch, "OutOfMemoryError", None) if torch is not None else None


def free_device_memory() -> None:
    """Collect garbage and return cached CUDA blocks; call it after leaving the `except` block."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
