"""Builders for input-photo tests: drawn product photos and masks, tiny inpainting (9-channel
UNet) models as a diffusers folder and as an A1111-layout single file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine_fixtures import make_single_file, tiny_folder

PRODUCT = (220, 30, 30)  # the "product": a red disc
BACKDROP = (30, 60, 210)


def product_photo(size: tuple[int, int] = (64, 64), alpha: bool = False):
    """A red disc (the product) on blue, or on transparency with `alpha`; and its mask
    (white = repaint: everything but the disc)."""
    from PIL import Image, ImageDraw

    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    photo = Image.new("RGBA" if alpha else "RGB", size, (0, 0, 0, 0) if alpha else BACKDROP)
    ImageDraw.Draw(photo).ellipse(box, fill=PRODUCT + ((255,) if alpha else ()))
    mask = Image.new("L", size, 255)
    ImageDraw.Draw(mask).ellipse(box, fill=0)
    return photo, mask


def make_inpaint_folder(dst: str | Path, family: str = "sd15", seed: int = 7) -> Path:
    """The tiny `family` model with a random 9-channel UNet (latents + mask + masked latents),
    as a diffusers folder (the inpainting checkpoints' layout)."""
    import torch
    from diffusers import UNet2DConditionModel

    src = tiny_folder(family)
    dst = Path(dst)
    if (dst / "model_index.json").is_file():
        return dst
    shutil.copytree(src, dst)
    cfg = json.loads((src / "unet" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["in_channels"] = 9
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    shutil.rmtree(dst / "unet")
    unet.save_pretrained(dst / "unet", safe_serialization=True)
    return dst


def make_inpaint_file(path: str | Path, folder: Path, family: str = "sd15") -> Path:
    """The inpainting folder as one A1111-layout `.safetensors` file."""
    return make_single_file(path, family, folder=folder)
