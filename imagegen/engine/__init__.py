"""The render engine: load SD1.5 / SDXL models offline, apply LoRA stacks, render batches.

Importing this package is cheap (no torch); torch, diffusers and transformers load on the
first `open_engine` call.

    engine = open_engine("builtin:tiny-sd15")
    engine.set_loras([("style.safetensors", 0.8)])
    results = engine.generate([GenRequest("a cat", "", 1, 512, 512, 25, 7.0, "DPM++ 2M Karras")])
"""

from __future__ import annotations

from .builtin import BUILTIN_MODELS
from ..modelfiles import check_lora, detect_family
from .controlnet import ControlRequest
from .engine import Engine, EngineDeviceError, EngineOOM, GenRequest, GenResult
from .hires import HiresRequest
from .photo import InitRequest
from .loading import open_engine

__all__ = [
    "BUILTIN_MODELS",
    "ControlRequest",
    "Engine",
    "EngineDeviceError",
    "EngineOOM",
    "GenRequest",
    "GenResult",
    "HiresRequest",
    "InitRequest",
    "check_lora",
    "detect_family",
    "open_engine",
]
