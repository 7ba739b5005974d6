"""Real-ESRGAN upscaling: our own RRDBNet / SRVGGNetCompact, seam-free tiles, huge outputs.

Importing this package does not import torch; `load_upscaler` does.

    up = load_upscaler("RealESRGAN_x4plus.pth")
    plan = plan_passes(1536, 1024, up.scale, target_width=17000)
    upscale_image(Path("in.png"), Path("out.tif"), up, plan)

Architectures are records, one folder each under `archs/`, listed in `registry.py`.
"""

from __future__ import annotations

from imagegen.defaults import FORMATS
from imagegen.upscale.archspec import ArchSpec
from imagegen.upscale.detect import LAYOUTS
from imagegen.upscale.registry import ARCHITECTURES as _REGISTRY

# Network name -> the official models it reproduces (the records are in `registry.py`).
ARCHITECTURES = {arch.name: arch.models for arch in _REGISTRY}

# Names whose modules need numpy or Pillow load on first use, so that recipe validation can
# read a weight file's header (`detect.check_weight_file`) without them.
_LAZY = {"allow_huge_images": "meta", "read_metadata": "meta", "Upscaler": "model", "load_upscaler": "model",
         "upscale_image": "pipeline", "PlanStep": "plan", "UpscalePlan": "plan", "plan_passes": "plan"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"imagegen.upscale.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'imagegen.upscale' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "FORMATS",
    "LAYOUTS",
    "ArchSpec",
    "PlanStep",
    "UpscalePlan",
    "Upscaler",
    "allow_huge_images",
    "load_upscaler",
    "plan_passes",
    "read_metadata",
    "upscale_image",
]
