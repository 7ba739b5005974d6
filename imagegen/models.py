"""Model families and built-in models, as data. Torch-free: recipe validation, the engine and
the CLI all read this table; adding a family (say SD3) starts with one record here.

A `Family` record names what differs between SD1.5 and SDXL: the diffusers pipeline class,
the text encoders and tokenizers, the default render size, and how a file is recognised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagegen.defaults import BUILTIN_PREFIX


@dataclass(frozen=True)
class Family:
    """One model family, e.g. SD1.5 or SDXL."""

    name: str  # recipe spelling: `model.family: sd15`
    label: str  # how messages name it
    pipeline_class: str  # diffusers pipeline class name (txt2img)
    img2img_class: str  # diffusers img2img pipeline class name (the hires pass, input photos; shares the components)
    inpaint_class: str  # diffusers inpainting pipeline class name (inpainting checkpoints' 9-channel UNets)
    text_encoders: tuple[str, ...]  # pipeline component names of the text encoders, in order
    tokenizers: tuple[str, ...]  # pipeline component names of the tokenizers, in order
    default_size: tuple[int, int]  # (width, height) when a recipe gives no `size`
    context_dim: int  # cross-attention width of the real model (LoRA detection)
    # SDXL-style conditioning: pooled text embeddings beside the per-token ones (and size
    # micro-conditioning), and `encode_prompt` takes keyword arguments.
    pooled_text: bool
    # Keys of an A1111/ComfyUI single file whose presence marks this family's text encoders.
    detection_keys: tuple[str, ...]
    # Extra keyword arguments for `from_single_file` / `from_pretrained` of this family.
    load_kwargs: tuple[tuple[str, object], ...] = ()
    # Pipeline attributes set after a generic `DiffusionPipeline.from_pretrained` (hub ids).
    after_load: tuple[tuple[str, object], ...] = ()


SD15 = Family(
    name="sd15", label="SD1.5", pipeline_class="StableDiffusionPipeline", img2img_class="StableDiffusionImg2ImgPipeline",
    inpaint_class="StableDiffusionInpaintPipeline",
    text_encoders=("text_encoder",), tokenizers=("tokenizer",),
    default_size=(512, 512), context_dim=768, pooled_text=False,
    detection_keys=("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",),
    load_kwargs=(("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)),
    after_load=(("safety_checker", None),),
)
SDXL = Family(
    name="sdxl", label="SDXL", pipeline_class="StableDiffusionXLPipeline", img2img_class="StableDiffusionXLImg2ImgPipeline",
    inpaint_class="StableDiffusionXLInpaintPipeline",
    text_encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"),
    default_size=(1024, 1024), context_dim=2048, pooled_text=True,
    detection_keys=("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                    "conditioner.embedders.1.model.token_embedding.weight"),
    load_kwargs=(("add_watermarker", False),),
    after_load=(("watermark", None),),
)

# The registry: every supported family, in the order messages list them.
FAMILY_RECORDS: tuple[Family, ...] = (SD15, SDXL)
FAMILIES: dict[str, Family] = {f.name: f for f in FAMILY_RECORDS}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)  # ("sd15", "sdxl")
FAMILY_CHOICES: tuple[str, ...] = ("auto", *FAMILY_NAMES)  # what `model.family` accepts
FAMILY_BY_PIPELINE: dict[str, str] = {f.pipeline_class: f.name for f in FAMILY_RECORDS}


def family(name: str) -> Family:
    """The record of family `name`. Raises KeyError for an unknown name (callers validate first)."""
    return FAMILIES[name]


# --- built-in models ----------------------------------------------------------------------------
# name -> family. The engine builds them (engine/builtin.py); recipes only need the names.
BUILTIN_FAMILY: dict[str, str] = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "demo-sd15": "sd15", "sd15-arch": "sd15", "sdxl-arch": "sdxl"}
BUILTIN_MODELS: tuple[str, ...] = tuple(BUILTIN_FAMILY)
TINY_DEFAULT_SIZE = (64, 64)  # the tiny built-ins render at this size when a recipe gives none
DEMO_DEFAULT_SIZE = (32, 32)  # builtin:demo-sd15 renders at its training size
# Files shipped with the package that a recipe names as `builtin:NAME` in a LoRA `path:` or
# `upscale.model:` (made by tools/train_demo.py for builtin:demo-sd15).
_DEMO = Path(__file__).resolve().parent / "data" / "demo"
BUILTIN_FILES: dict[str, Path] = {"demo-outline": _DEMO / "demo-outline.safetensors", "demo-x4": _DEMO / "demo-x4.pth"}


def builtin_name(checkpoint: str) -> str | None:
    """`tiny-sd15` for "builtin:tiny-sd15"; None when `checkpoint` is not a builtin reference."""
    return checkpoint[len(BUILTIN_PREFIX):] if str(checkpoint).startswith(BUILTIN_PREFIX) else None


def default_size(checkpoint: str, family_name: str) -> tuple[int, int] | None:
    """The size a recipe without `size:` renders at; None when the family is not known yet."""
    name = builtin_name(checkpoint)
    if name is not None and name.startswith("tiny-"):
        return TINY_DEFAULT_SIZE
    if name == "demo-sd15":
        return DEMO_DEFAULT_SIZE
    rec = FAMILIES.get(family_name)
    return rec.default_size if rec else None
