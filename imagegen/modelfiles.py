"""Tell which model family a checkpoint, diffusers folder or LoRA belongs to, from its keys and
shapes alone (recipe validation and the engine both call this). Torch-free: a `.safetensors` header is JSON, read without loading any tensor.

diffusers' own inference quietly falls back to SD1.5 for files it does not recognise, so we look
first and refuse anything that is not an SD1.5 or SDXL base model, saying what we saw.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from imagegen.defaults import BUILTIN_PREFIX
from imagegen.errors import ModelError
from imagegen.models import BUILTIN_FAMILY, FAMILY_NAMES, SD15, SDXL

FAMILIES: tuple[str, ...] = FAMILY_NAMES
INPAINT_CHANNELS = 9  # UNet input channels of an inpainting model: latents 4 + mask 1 + masked image 4
INPAINT_WHAT = "an inpainting model"  # what `classify_checkpoint_keys` says of one (family known)
INPAINT_ONLY = ("unsupported model: detected an inpainting model (UNet takes 9 input channels), which renders "
                "img2img and inpainting jobs only: give `init_image:` (and `mask:`), or use a base checkpoint for "
                "text-to-image")

_UNET = "model.diffusion_model."
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name in a `.safetensors` file with its shape (no tensor data is read).

    Raises ModelError if the file is missing or is not a readable safetensors file.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: file not found")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > _MAX_HEADER:
                raise ValueError(f"header length {n} out of range")
            raw = f.read(n)
        if not raw.lstrip()[:1] == b"{":  # `[1,2,3]` or 200k `[`: not a header, and never parsed
            raise ValueError("the header is not a JSON object")
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        shapes = {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            shape = v.get("shape") if isinstance(v, dict) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise ValueError(f"tensor {str(k)[:80]!r} has no shape")
            shapes[k] = tuple(shape)
        return shapes
    except RecursionError:
        raise ModelError(f"{p}: not a readable .safetensors file (the header nests too deep)") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelError(f"{p}: not a readable .safetensors file ({e})") from None


def _context_dim(shapes: dict[str, tuple[int, ...]]) -> int | None:
    for k, s in shapes.items():
        if k.startswith(_UNET) and k.endswith("attn2.to_k.weight") and len(s) == 2:
            return s[1]
    return None


CLIP_L_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
_TOKEN_EMB = "embeddings.token_embedding.weight"


def bare_clip_prefix(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The prefix of a CLIP-L text encoder stored without the `text_model.` level (what
    transformers 5 saves, and diffusers' conversion script then writes), or None when the
    checkpoint has the classic `...transformer.text_model.` layout or no CLIP-L."""
    for prefix in CLIP_L_PREFIXES:
        if prefix + _TOKEN_EMB in shapes and prefix + "text_model." + _TOKEN_EMB not in shapes:
            return prefix
    return None


def _clip_l_key(shapes: dict[str, tuple[int, ...]], prefix: str) -> str:
    bare = prefix + _TOKEN_EMB
    return bare if bare in shapes else prefix + "text_model." + _TOKEN_EMB


def classify_checkpoint_keys(shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str]:
    """(family or None, what was detected) for the tensors of an A1111/ComfyUI single file."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(".joint_blocks." in k or k.startswith(("joint_blocks.", "text_encoders.")) for k in keys):
        return None, "a Stable Diffusion 3 checkpoint (`joint_blocks` / `text_encoders` keys)"
    if any("double_blocks." in k or "single_blocks." in k for k in keys):
        return None, "a Flux-style transformer checkpoint (`double_blocks` keys)"
    if not has(_UNET):
        if has("lora_") or any(".lora_" in k or ".lora." in k for k in keys):
            return None, "a LoRA, not a checkpoint"
        if has("encoder.down.") or has("decoder.up.") or has("encoder.down_blocks."):
            return None, "a VAE, not a checkpoint"
        if any(k.startswith(("down_blocks.", "conv_in.", "transformer_blocks.")) for k in keys):
            return None, "a diffusers-format model weight file, not an A1111/ComfyUI checkpoint"
        return None, f"no `{_UNET}` UNet keys ({len(shapes)} tensors)"
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    in_ch = conv_in[1] if conv_in and len(conv_in) == 4 else None
    ctx = _context_dim(shapes)
    # CLIP-L with or without the `text_model.` level (classic vs transformers-5 layout)
    clip_l_sd1 = _clip_l_key(shapes, CLIP_L_PREFIXES[0])
    clip_l_xl = _clip_l_key(shapes, CLIP_L_PREFIXES[1])
    open_clip_xl = SDXL.detection_keys[1]
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        return None, "an SDXL refiner (OpenCLIP-G text encoder only)"
    if has("cond_stage_model.model."):
        return None, f"a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder, context dim {ctx})"
    if in_ch is not None and in_ch not in (4, INPAINT_CHANNELS):
        kind = {8: "an instruct-pix2pix style"}.get(in_ch, "a non-standard")
        return None, f"{kind} model (UNet takes {in_ch} input channels, not 4)"
    inpaint = in_ch == INPAINT_CHANNELS
    if clip_l_xl in shapes and open_clip_xl in shapes:
        want = shapes[clip_l_xl][1] + shapes[open_clip_xl][1]
        if ctx is not None and ctx != want:
            return None, f"an SDXL-like checkpoint whose UNet context dim {ctx} != {want}"
        if not has(_UNET + "label_emb."):
            return None, "an SDXL-like checkpoint without the UNet `label_emb` (size conditioning)"
        return "sdxl", INPAINT_WHAT if inpaint else "SDXL base"
    if clip_l_sd1 in shapes:
        hidden = shapes[clip_l_sd1][1]
        if ctx == 1024:
            return None, "a Stable Diffusion 2.x UNet (context dim 1024)"
        if ctx is not None and ctx != hidden:
            return None, f"an SD1-like checkpoint whose UNet context dim {ctx} != text width {hidden}"
        return "sd15", INPAINT_WHAT if inpaint else "SD1.x"
    if ctx == 1024:
        return None, "a Stable Diffusion 2.x UNet (context dim 1024)"
    if has(_UNET + "label_emb."):
        return None, "an SDXL UNet without its text encoders (`conditioner.embedders` missing)"
    return None, f"a UNet without a CLIP text encoder (`cond_stage_model` missing, context dim {ctx})"


def _folder_family(folder: Path) -> tuple[str | None, str]:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / 'model_index.json'}: cannot read ({e})") from None
    cls = index.get("_class_name", "")
    unet_cfg: dict = {}
    try:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    in_ch = unet_cfg.get("in_channels", 4)
    ctx = unet_cfg.get("cross_attention_dim")
    if cls in ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"):
        if not index.get("text_encoder") or index.get("text_encoder") == [None, None]:
            return None, "an SDXL pipeline without `text_encoder` (refiner layout)"
        if in_ch not in (4, INPAINT_CHANNELS):
            return None, f"an SDXL pipeline whose UNet takes {in_ch} input channels"
        return "sdxl", INPAINT_WHAT if in_ch == INPAINT_CHANNELS else "SDXL (diffusers folder)"
    if cls in ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"):
        if ctx == 1024:
            return None, "a Stable Diffusion 2.x pipeline (cross_attention_dim 1024)"
        if in_ch not in (4, INPAINT_CHANNELS):
            return None, f"a pipeline whose UNet takes {in_ch} input channels"
        return "sd15", INPAINT_WHAT if in_ch == INPAINT_CHANNELS else "SD1.x (diffusers folder)"
    return None, f"a `{cls or 'unknown'}` pipeline"


def detect_family(path: str | Path) -> str:
    """"sd15" or "sdxl" for a single-file `.safetensors` checkpoint, a diffusers folder, or a
    `builtin:<name>` reference, of a base model (text-to-image).

    Raises ModelError for a missing path, an unreadable file, or anything else (SD2, SD3, Flux,
    inpainting, SDXL refiner, a LoRA or VAE, unknown), saying what was detected.
    """
    family, inpainting = detect_model(path)
    if inpainting:
        raise ModelError(f"{path}: {INPAINT_ONLY}")
    return family


def detect_model(path: str | Path) -> tuple[str, bool]:
    """(family, inpainting) of a checkpoint: as `detect_family`, but an inpainting model (a UNet
    of 9 input channels, for img2img and inpainting jobs) is accepted, with `inpainting` True.

    Raises ModelError as `detect_family` does for everything else."""
    if str(path).startswith(BUILTIN_PREFIX):
        name = str(path).split(":", 1)[1]
        if name not in BUILTIN_FAMILY:
            raise ModelError(f"unknown builtin model {str(path)!r}; available: "
                             + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_FAMILY))  # fmt: skip
        return BUILTIN_FAMILY[name], False
    p = Path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ModelError(f"{p}: folder has no `model_index.json`; expected a diffusers pipeline folder")
        family, what = _folder_family(p)
    elif p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise ModelError(
                f"{p}: unsupported checkpoint format `{p.suffix}`; use a `.safetensors` single file "
                "or a diffusers folder (pickled .ckpt files are not loaded)"
            )
        family, what = classify_checkpoint_keys(read_safetensors_shapes(p))
    else:
        raise ModelError(f"{p}: file not found")
    if family is None:
        raise ModelError(f"{p}: unsupported model: detected {what}; supported: SD1.5 and SDXL base (and their inpainting models)")
    return family, what == INPAINT_WHAT


# ---------------------------------------------------------------------------------------------
# LoRAs

_NON_SD_LORA = re.compile(r"(double_blocks|single_blocks|joint_blocks|single_transformer_blocks|^transformer\.)")
# Cross-attention key input width of the real models; SD2 (1024) is rejected.
# 64: builtin:demo-sd15's text encoder width (an SD1.5 architecture; its UNet has no attention
# in down_blocks.0, so the block names alone cannot place its LoRA)
_CONTEXT_DIMS = {SD15.context_dim: "sd15", SDXL.context_dim: "sdxl", 64: "sd15"}
# Blocks that exist with attention in one family only (diffusers and kohya spellings).
_SD15_ONLY = re.compile(
    r"(down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|input_blocks[._][12][._]1[._]"
    r"|output_blocks[._](9|10|11)[._]1[._])"
)
_SDXL_ONLY = re.compile(r"(transformer_blocks[._][1-9][._]|lora_te[12]_|text_encoder_2[._]|lora_te2|add_embedding)")


def lora_family_votes(shapes: dict[str, tuple[int, ...]]) -> tuple[set[str], str]:
    """(families the LoRA's keys point at, note). Empty set: cannot tell."""
    votes: set[str] = set()
    notes = []
    for k in shapes:
        if _NON_SD_LORA.search(k):
            return {"other"}, f"key `{k}` belongs to a transformer model (SD3/Flux), not SD1.5/SDXL"
    for k, s in shapes.items():
        down = ("attn2" in k and "to_k" in k) and (
            "lora_down" in k or "lora_A" in k or "lora.down" in k or "to_k_lora.down" in k
        )
        if down and len(s) == 2:
            fam = _CONTEXT_DIMS.get(s[1])
            if s[1] == 1024:
                return {"other"}, f"cross-attention width 1024 (`{k}`) is Stable Diffusion 2.x"
            if fam:
                votes.add(fam)
                notes.append(f"cross-attention width {s[1]}")
            break
    if any(_SDXL_ONLY.search(k) for k in shapes):
        votes.add("sdxl")
        notes.append("SDXL-only blocks or text encoder 2")
    if any(_SD15_ONLY.search(k) for k in shapes):
        votes.add("sd15")
        notes.append("SD1.5-only attention blocks")
    if not votes and any(k.startswith("lora_te_") for k in shapes):
        votes.add("sd15")
        notes.append("single text encoder")
    return votes, ", ".join(notes)


def check_lora(path: str | Path, family: str) -> None:
    """Check that the LoRA file at `path` fits a base model of `family` ("sd15" or "sdxl").

    Raises ModelError naming the file if it is missing, unreadable, not a LoRA, made for the
    other family (or SD2/SD3/Flux), or of a layout we cannot place.
    """
    p = Path(path)
    if family not in FAMILIES:
        raise ModelError(f"`family` must be one of {', '.join(FAMILIES)}, got {family!r}")
    if p.suffix.lower() != ".safetensors":
        raise ModelError(f"LoRA {p}: only `.safetensors` LoRA files are supported, got `{p.suffix}`")
    shapes = read_safetensors_shapes(p)
    if not any("lora" in k.lower() for k in shapes):
        raise ModelError(f"LoRA {p}: no LoRA tensors found ({len(shapes)} tensors, none named `lora`)")
    votes, note = lora_family_votes(shapes)
    if votes == {"other"}:
        raise ModelError(f"LoRA {p}: not an SD1.5/SDXL LoRA: {note}")
    if not votes:
        raise ModelError(f"LoRA {p}: cannot tell whether it is for SD1.5 or SDXL from its keys")
    if len(votes) > 1:
        raise ModelError(f"LoRA {p}: keys point at both SD1.5 and SDXL ({note})")
    (found,) = votes
    if found != family:
        raise ModelError(f"LoRA {p} is for {found} ({note}) but the model is {family}")


# ---------------------------------------------------------------------------------------------
# ControlNets

_CONTROLNET_DIFFUSERS_KEYS = ("controlnet_cond_embedding.conv_in.weight", "controlnet_mid_block.weight")
_CONTROLNET_LDM_KEYS = ("input_hint_block.0.weight", "middle_block_out.0.weight")


def read_controlnet_layout(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[str, str]:
    """("diffusers" | "ldm", key prefix) of a ControlNet file, from its header (torch-free).

    Raises ModelError for a file that is missing, unreadable, or not a ControlNet (naming what it
    looks like when we can tell: a checkpoint, a LoRA, a ControlNet-LoRA, a union ControlNet)."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise ModelError(f"ControlNet {p}: only `.safetensors` files are supported")
    shapes = read_safetensors_shapes(p) if shapes is None else shapes
    if all(k in shapes for k in _CONTROLNET_DIFFUSERS_KEYS):
        if any(k.startswith(("task_embedding", "spatial_ch_projs")) for k in shapes):
            raise ModelError(f"ControlNet {p}: a ControlNet-Union model, which is not supported")
        return "diffusers", ""
    for prefix in ("control_model.", ""):
        if all(prefix + k in shapes for k in _CONTROLNET_LDM_KEYS):
            return "ldm", prefix
    if any("lora_controlnet" in k for k in shapes) or any(k.endswith((".up", ".down")) and "input_hint_block" in k for k in shapes):
        raise ModelError(f"ControlNet {p}: a Control-LoRA, which is not supported; use a full ControlNet model")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for k in shapes):
        looks = "a Stable Diffusion checkpoint"
    elif any("lora_" in k or ".lora_A." in k for k in shapes):
        looks = "a LoRA"
    else:
        looks = f"{len(shapes)} tensors, e.g. {next(iter(shapes), '(none)')!r}"
    raise ModelError(f"ControlNet {p}: not a ControlNet model (no `controlnet_cond_embedding` or `input_hint_block` keys; "
                     f"it looks like {looks})")


def controlnet_family(path: str | Path) -> str | None:
    """"sd15" or "sdxl" for a ControlNet `.safetensors` file, from its header (SDXL ControlNets
    have the size-conditioning `add_embedding` / `label_emb`); the full check of its fit to the
    model is `engine.controlnet.load_controlnet`'s. Raises ModelError as `read_controlnet_layout`."""
    shapes = read_safetensors_shapes(path)
    _, prefix = read_controlnet_layout(path, shapes)
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    return "sdxl" if any(k.startswith(("add_embedding.", "label_emb.")) for k in keys) else "sd15"


def check_controlnet(path: str | Path, family: str) -> None:
    """Raises ModelError naming the file when it is not a ControlNet or is for the other family."""
    found = controlnet_family(path)
    if family in FAMILIES and found != family:
        label = {"sd15": "SD1.5", "sdxl": "SDXL"}
        raise ModelError(f"ControlNet {path}: an {label[found]} ControlNet, but the model is {label[family]}")
