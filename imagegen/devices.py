"""The one device and dtype resolver, for the engine, the upscaler and the CLI's early checks.

torch is imported inside the functions only: importing this module costs nothing.
"""

from __future__ import annotations

from imagegen.defaults import DTYPES
from imagegen.errors import InputError


def resolve_device(device: str | None) -> str:
    """`device` or the default: "cuda" when available, else "cpu".

    Raises InputError for a name torch does not know, or a CUDA/MPS device this machine lacks."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device).strip().lower()
    try:
        kind = torch.device(dev).type
    except (RuntimeError, ValueError):
        raise InputError(f"`device` {device!r} is not a torch device; use e.g. cpu, cuda, cuda:1, mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"`device` {device!r}: CUDA is not available on this machine (torch {torch.__version__})")
    index = torch.device(dev).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise InputError(f"`device` {device!r}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                         f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"`device` {device!r}: MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str | None, device: str, *, half_on_cpu: bool = True) -> str:
    """torch dtype name for `dtype` ("fp16", "bf16", "fp32", ...) or the device default: fp32 on
    CPU, fp16 elsewhere. `half_on_cpu=False` refuses fp16 on CPU (the upscaler's convolutions
    have no fast fp16 CPU kernels).

    Raises InputError for an unknown name, or fp16 on CPU where it is refused."""
    if dtype is None or dtype == "auto":
        return "float32" if device.startswith("cpu") else "float16"
    name = DTYPES.get(str(dtype).strip().lower())
    if name is None:
        raise InputError(f"`dtype` {dtype!r} is not supported; use fp16, bf16 or fp32")
    if name == "float16" and device.startswith("cpu") and not half_on_cpu:
        raise InputError("`dtype` fp16 is not supported on CPU; use fp32 (or bf16)")
    return name
