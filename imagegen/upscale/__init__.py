"""Real-ESRGAN upscaling: our own RRDBNet / SRVGGNetCompact, seam-free tiles, huge outputs.

Importing this package does not import torch; `load_upscaler` does.

    up = load_upscaler("RealESRGAN_x4plus.pth")
    plan = plan_passes(1536, 1024, up.scale, target_width=17000)
    upscale_image(Path("in.png"), Path("out.tif"), up, plan)

Supported architectures are listed in `ARCHITECTURES`; detection lives in `detect.py`.
"""

from __future__ import annotations

from imagegen.upscale.detect import LAYOUTS, ArchSpec
from imagegen.upscale.meta import allow_huge_images, read_metadata
from imagegen.upscale.model import Upscaler, load_upscaler
from imagegen.upscale.pipeline import upscale_image
from imagegen.upscale.plan import PlanStep, UpscalePlan, plan_passes
from imagegen.defaults import FORMATS

# The network classes in `arch.py` and the official models each reproduces.
ARCHITECTURES = {
    "RRDBNet": ("RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B", "ESRGAN (old layout)"),
    "SRVGGNetCompact": ("realesr-general-x4v3", "realesr-animevideov3"),
}

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
