"""Real-ESRGAN upscaling: our own RRDBNet / SRVGGNetCompact, seam-free tiles, huge outputs.

Importing this package does not import torch; `load_upscaler` does.

    up = load_upscaler("RealESRGAN_x4plus.pth")
    plan = plan_passes(1536, 1024, up.scale, target_width=17000)
    upscale_image(Path("in.png"), Path("out.tif"), up, plan)

Architectures are records, one folder each under `archs/`, listed in `registry.py`.
"""

from __future__ import annotations

from imagegen.upscale.archspec import ArchSpec
from imagegen.upscale.detect import LAYOUTS
from imagegen.upscale.meta import allow_huge_images, read_metadata
from imagegen.upscale.model import Upscaler, load_upscaler
from imagegen.upscale.pipeline import upscale_image
from imagegen.upscale.plan import PlanStep, UpscalePlan, plan_passes
from imagegen.defaults import FORMATS

from imagegen.upscale.registry import ARCHITECTURES as _REGISTRY

# Network name -> the official models it reproduces (the records are in `registry.py`).
ARCHITECTURES = {arch.name: arch.models for arch in _REGISTRY}

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
