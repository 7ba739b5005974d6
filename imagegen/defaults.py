"""Shared values that are not recipe keys: one definition each, with what it means.

Recipe-key defaults (`steps`, `guidance`, ...) live in `recipe.DEFAULTS`, next to the schema.
Nothing here imports anything heavy; every module may import this one.
"""

from __future__ import annotations

import os
from pathlib import Path

# --- seeds and sizes ------------------------------------------------------------------------
MAX_SEED = 2**32 - 1  # A1111's seed range; recipes, the engine and `reproduce` all accept 0..MAX_SEED
MIN_RENDER_SIDE = 32  # smallest width/height a recipe may render (multiple of 8)
MAX_RENDER_SIDE = 8192  # largest width/height a recipe may render: far beyond any SD model's training size
MAX_SHEET_SIDE = 16_000  # no contact-sheet page side longer than this: JPEG allows 65,535; viewers like less
MAX_UPSCALE_SIDE = 65_000  # longest upscaled output side (TIFF/PNG could go further; no client needs it)
MIN_UPSCALE_SIDE = 16  # smallest `upscale.width` / `upscale.height`
JPEG_MAX_SIDE = 65_500  # JPEG stores sides in 16 bits (with a margin for the codec)

# --- recipe limits: checked before anything is built (count first, then expand) --------------
MAX_RECIPE_BYTES = 4 << 20  # a recipe file larger than this is refused before it is parsed
MAX_YAML_DEPTH = 40  # nested lists/mappings in a recipe (real recipes nest 4 deep)
MAX_YAML_VALUES = 100_000  # values a recipe may hold once YAML aliases (`*name`) are followed
MAX_JOBS_LIMIT = 10_000_000  # the largest `max_jobs` a recipe may set: a manifest row per job must fit a disk

# --- hires pass ------------------------------------------------------------------------------
# `hires.upscaler` names -> (A1111's infotext name, torch interpolation mode on the latents, or
# None for a pixel upscaler). A weight file (Real-ESRGAN) is the other choice.
HIRES_UPSCALERS: dict[str, tuple[str, str | None]] = {
    "latent": ("Latent", "bilinear"),  # A1111 "Latent": bilinear, no antialias
    "latent-bicubic": ("Latent (bicubic)", "bicubic"),
    "latent-nearest": ("Latent (nearest)", "nearest"),
    "lanczos": ("Lanczos", None),  # decode, Lanczos-resize the 8-bit image, encode
}
MAX_HIRES_SCALE = 8.0  # largest `hires.scale` (A1111's slider stops at 4)

# --- upscale output formats -----------------------------------------------------------------
# Canonical format -> the spellings accepted on the command line and as file suffixes.
FORMATS: dict[str, tuple[str, ...]] = {
    "tif": ("tif", "tiff"),  # tiled Deflate BigTIFF: streams by tile, no size limit, opens everywhere
    "png": ("png",),  # streamed and lossless
    "jpg": ("jpg", "jpeg"),  # lossy; the whole 8-bit image in memory; at most JPEG_MAX_SIDE
}
DEFAULT_FORMAT = "tif"  # what `upscale` writes when neither the recipe nor the command line says
FORMAT_ALIASES: dict[str, str] = {alias: fmt for fmt, aliases in FORMATS.items() for alias in aliases}

# --- devices and dtypes ---------------------------------------------------------------------
# Accepted `dtype` spellings -> torch dtype name. None/"auto" means fp16 on a GPU, fp32 on CPU.
DTYPES: dict[str, str] = {
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}
DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}  # how dtypes are shown and recorded

# --- files ------------------------------------------------------------------------------------
TMP_PREFIX = ".tmp-"  # temporary files of atomic writes (`.tmp-<name>.<pid>.<hex>`); only those are removed on the next start
RECIPE_INLINE_BYTES = 64 * 1024  # a recipe up to this size rides whole in each image's `imagegen` chunk; a larger one by sha256 + recipe-history/ file (Pillow opens text chunks up to 1 MB)
BUILTIN_PREFIX = "builtin:"  # checkpoint references to the built-in models: builtin:<name>


def cache_root() -> Path:
    """Where imagegen caches built-in models and file hashes: `$IMAGEGEN_CACHE`, else
    `$XDG_CACHE_HOME/imagegen`, else `~/.cache/imagegen`. Never raises."""
    env = os.environ.get("IMAGEGEN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "imagegen"


def defaults_file() -> Path:
    """The user's defaults file (machine settings that are not part of any recipe, e.g.
    `render.compile`): `$IMAGEGEN_DEFAULTS`, else `$XDG_CONFIG_HOME/imagegen/defaults.yaml`, else
    `~/.config/imagegen/defaults.yaml`. It need not exist. Never raises."""
    env = os.environ.get("IMAGEGEN_DEFAULTS")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".config") / "imagegen" / "defaults.yaml"
