"""ControlNet: load a model from one `.safetensors` file (offline), fit a control image to the
job's size, and build the family's ControlNet pipeline over an engine's loaded components.

    load_controlnet(path, family, device=, dtype=, unet=)   -> diffusers ControlNetModel (cached)
    prepare_control_image(image, width, height)             -> PIL RGB image of the job's size
    controlnet_pipeline(pipe, family, units, kind=)         -> (pipeline, call kwargs)

Two key layouts are read:
- diffusers (`controlnet_cond_embedding.*`, `down_blocks.*`, `controlnet_down_blocks.*`), as
  diffusers saves them and as xinsir's SDXL files ship;
- the original ControlNet/LDM layout (`input_blocks.*`, `input_hint_block.*`, `zero_convs.*`,
  `middle_block_out.*`, with or without the `control_model.` prefix), as lllyasviel's
  control_v11p_sd15_canny ships; diffusers' `convert_controlnet_checkpoint` renames its keys.

The model's config comes from the tensor shapes (channels, blocks, layers per block, transformer
depth, cross-attention width, linear or conv projections, SDXL's `add_embedding`, conditioning
channels). Shapes cannot tell attention heads, norm groups or SDXL's time-embedding width: those
come from the base model's UNet (`unet=`, what a ControlNet is copied from, so they agree), else
from the family's shipped config (imagegen/data/configs) when the channels are the real model's,
else a rule (SD1.5: 8 heads; SDXL: 64-wide heads). Nothing is fetched from the hub.

torch and diffusers are imported inside functions only.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InputError, ModelError
from ..modelfiles import read_controlnet_layout  # torch-free: recipe validation reads it too

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

__all__ = ["ControlRequest", "ControlUnit", "controlnet_pipeline", "infer_controlnet_config", "load_controlnet", "prepare_control_image",
           "read_controlnet_layout"]

# diffusers pipeline class per (family, kind); "txt2img" takes the control image as `image`,
# the other two as `control_image` (their `image` is the init image).
PIPELINE_CLASSES: dict[tuple[str, str], str] = {
    ("sd15", "txt2img"): "StableDiffusionControlNetPipeline",
    ("sd15", "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd15", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}
MAX_CACHED = 4  # loaded ControlNets kept in memory (a recipe rarely uses more at once)
_FAMILY_LABEL = {"sd15": "SD1.5", "sdxl": "SDXL"}
# Settings shapes cannot tell, taken from the base UNet's config when given.
_FROM_UNET = ("attention_head_dim", "num_attention_heads", "norm_num_groups", "norm_eps", "upcast_attention",
              "flip_sin_to_cos", "freq_shift", "act_fn", "resnet_time_scale_shift", "addition_time_embed_dim",
              "only_cross_attention")  # fmt: skip

_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


# -- reading a file ---------------------------------------------------------------------------


def _ldm_layers_per_block(sd: dict) -> int:
    """Layers per block of an LDM ControlNet: the first downsampler sits at input block lpb+1."""
    ops = sorted(int(m[1]) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    if ops:
        return ops[0] - 1
    blocks = {int(m[1]) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    return max(blocks) if blocks else 1


def _to_diffusers(sd: dict, prefix: str) -> dict:
    """An LDM ControlNet state dict (tensors, or shapes for a torch-free look) in diffusers' names."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    bare = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = convert_controlnet_checkpoint(bare, {"layers_per_block": _ldm_layers_per_block(bare)})
    for i, j in ((0, 1), (2, 2)):  # SDXL's size embedding: diffusers' converter leaves it out
        for t in ("weight", "bias"):
            if f"label_emb.0.{i}.{t}" in bare:
                out[f"add_embedding.linear_{j}.{t}"] = bare[f"label_emb.0.{i}.{t}"]
    return {k: v for k, v in out.items() if v is not None}


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def infer_controlnet_config(shapes: dict[str, Any], family: str | None = None, unet_config: dict | None = None) -> dict:
    """A `ControlNetModel` config from diffusers-named tensor shapes (or tensors).

    Settings that shapes cannot tell come from `unet_config` (the base UNet's), else from the
    shipped config of `family` when the channels are the real model's, else a rule (module doc).
    Raises KeyError for a key set that is not a whole ControlNet (the caller names the file)."""
    sh = {k: _shape(v) for k, v in shapes.items()}
    blocks = sorted({int(m[1]) for k in sh if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    if not blocks:
        raise KeyError("down_blocks")
    out_ch = [sh[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in blocks]
    lpb = len({m[1] for k in sh if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})
    types, depth, cross, linear = [], [], None, False
    for i in blocks:
        tb = {m[1] for k in sh if (m := re.match(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.", k))}
        types.append("CrossAttnDownBlock2D" if tb else "DownBlock2D")
        depth.append(max(len(tb), 1))
        if tb:
            cross = sh[f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.to_k.weight"][1]
            linear = len(sh[f"down_blocks.{i}.attentions.0.proj_in.weight"]) == 2
    mid_tb = {m[1] for k in sh if (m := re.match(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.", k))}
    if mid_tb:
        cross = cross or sh["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"][1]
        linear = linear or len(sh["mid_block.attentions.0.proj_in.weight"]) == 2
    emb = [sh["controlnet_cond_embedding.conv_in.weight"][0]]
    emb += [sh[k][0] for k in sorted((k for k in sh if re.match(r"controlnet_cond_embedding\.blocks\.\d+\.weight$", k)),
                                      key=lambda k: int(k.split(".")[2]))[1::2]]  # fmt: skip
    sdxl = "add_embedding.linear_1.weight" in sh
    config: dict[str, Any] = {
        "in_channels": sh["conv_in.weight"][1],
        "conditioning_channels": sh["controlnet_cond_embedding.conv_in.weight"][1],
        "block_out_channels": out_ch,
        "down_block_types": types,
        "layers_per_block": lpb,
        "transformer_layers_per_block": depth,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_tb else "UNetMidBlock2D",
        "cross_attention_dim": cross or 768,
        "use_linear_projection": linear,
        "conditioning_embedding_out_channels": emb,
    }
    if mid_tb and len(mid_tb) != depth[-1]:  # diffusers builds the mid block with the last block's depth
        raise KeyError(f"mid_block with {len(mid_tb)} transformer layers but the last down block has {depth[-1]}")
    if sdxl:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = sh["add_embedding.linear_1.weight"][1]
    base = _base_settings(family or ("sdxl" if sdxl else "sd15"), out_ch, unet_config)
    config.update(base)
    if sdxl and "addition_time_embed_dim" not in config:
        config["addition_time_embed_dim"] = 256
    if "attention_head_dim" not in config and "num_attention_heads" not in config:
        config["attention_head_dim"] = [max(1, c // 64) for c in out_ch] if sdxl else 8
    return config


def _base_settings(family: str, out_ch: list[int], unet_config: dict | None) -> dict:
    """The settings shapes cannot tell: from the base UNet's config, else the family's shipped one
    when the channels are the same, else {}."""
    if unet_config is None:
        from .builtin import CONFIG_DIR

        shipped = CONFIG_DIR / family / "unet" / "config.json"
        cfg = json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file() else {}
        if list(cfg.get("block_out_channels", [])) != list(out_ch):
            return {}
        unet_config = cfg
    return {k: unet_config[k] for k in _FROM_UNET if unet_config.get(k) is not None}


def _fits(path: Path, config: dict, family: str, unet_config: dict | None) -> None:
    """Raises ModelError when the ControlNet is of another family than the base model, or (with
    the base UNet's config) its outputs would not fit the UNet's blocks or text width."""
    label = _FAMILY_LABEL.get(family, family)
    is_xl = config.get("addition_embed_type") == "text_time"
    if is_xl != (family == "sdxl"):
        raise ModelError(f"ControlNet {path}: an {'SDXL' if is_xl else 'SD1.5'} ControlNet, but the model is {label}")
    if unet_config is None:
        from ..models import FAMILIES

        rec = FAMILIES.get(family)
        real = _base_settings(family, config["block_out_channels"], None)
        if rec is not None and real and config["cross_attention_dim"] != rec.context_dim:
            raise ModelError(f"ControlNet {path}: cross-attention width {config['cross_attention_dim']}, but {label} models "
                             f"use {rec.context_dim} (a ControlNet for another model family?)")
        return
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels"):
        want, got = unet_config.get(key), config[key]
        if want is not None and (list(want) if isinstance(want, (list, tuple)) else want) != (list(got) if isinstance(got, (list, tuple)) else got):
            raise ModelError(f"ControlNet {path}: `{key}` {got} does not fit the model's UNet ({want}); "
                             f"a ControlNet for another {label} architecture?")


def _stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def load_controlnet(path: str | Path, family: str, *, device: str = "cpu", dtype: Any = None, unet: Any = None) -> Any:
    """The diffusers `ControlNetModel` in `path` (one `.safetensors` file), for a base model of
    `family` ("sd15" | "sdxl"), on `device` in `dtype` (a torch dtype or a name such as "fp16";
    default the device's: fp32 on CPU, fp16 elsewhere), in eval mode.

    `unet` is the base model's UNet (or its config dict): it supplies the settings that tensor
    shapes cannot tell (attention heads) and lets us refuse a ControlNet that would not fit it.
    Loaded models are cached by (path, size, mtime, family, device, dtype, UNet settings): a
    rewritten file is loaded again. Offline: nothing is fetched.

    Raises ModelError (an InputError) naming the file for a missing or unreadable file, a file
    that is not a ControlNet, one of another family, or one whose tensors do not fit its layout."""
    import torch

    from ..devices import resolve_dtype

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"ControlNet {p}: file not found")
    from ..fsutil import not_a_regular_file

    if why := not_a_regular_file(p):
        raise ModelError(f"ControlNet {p}: {why}")
    if family not in _FAMILY_LABEL:
        raise InputError(f"`family` must be sd15 or sdxl, got {family!r}")
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, resolve_dtype(dtype, str(device)))
    unet_config = dict(getattr(unet, "config", unet)) if unet is not None else None
    hint = tuple((k, json.dumps(unet_config.get(k))) for k in _FROM_UNET) if unet_config else ()
    key = (*_stamp(p), family, str(device), str(torch_dtype), hint)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit

    # 1. Layout and config from the header alone; refuse the wrong family before reading tensors.
    layout, prefix = read_controlnet_layout(p)
    from ..modelfiles import read_safetensors_shapes

    shapes = read_safetensors_shapes(p)
    named = _to_diffusers(shapes, prefix) if layout == "ldm" else shapes
    try:
        config = infer_controlnet_config(named, family, unet_config)
    except (KeyError, IndexError, TypeError) as e:
        raise ModelError(f"ControlNet {p}: an incomplete or unknown ControlNet layout ({layout}; missing {e})") from None
    _fits(p, config, family, unet_config)

    # 2. Tensors, renamed for diffusers when needed, copied into a model built without random
    #    initialisation (meta, then uninitialised memory on the device). Copied, not assigned:
    #    safetensors' tensors can sit at addresses that are not 64-byte aligned, and CPU kernels
    #    then sum in another order (outputs off by ~1e-6 from the same weights in torch's memory).
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    from .device_errors import one_line as _one_line

    try:
        sd = load_file(str(p))
    except Exception as e:  # safetensors' own error class: a truncated or damaged file
        raise ModelError(f"ControlNet {p}: cannot read its tensors: {_one_line(e)}") from None
    if layout == "ldm":
        sd = _to_diffusers(sd, prefix)
    with torch.device("meta"):
        model = ControlNetModel(**config).to(dtype=torch_dtype)
    model = model.to_empty(device=device)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelError(f"ControlNet {p}: its tensors do not fit the inferred {layout} layout: {_one_line(e)}") from None
    del sd
    model.eval()
    with _cache_lock:
        while len(_cache) >= MAX_CACHED:
            _cache.pop(next(iter(_cache)))
        _cache[key] = model
    return model


def clear_cache() -> None:
    """Forget the loaded ControlNets (tests; or to free memory between recipes)."""
    with _cache_lock:
        _cache.clear()


# -- control images ---------------------------------------------------------------------------


def prepare_control_image(image: "PIL.Image.Image", width: int, height: int) -> "PIL.Image.Image":
    """`image` fitted to `width`x`height` as an RGB image, the rule A1111 calls "Crop and Resize":
    scale (Lanczos) so that the image covers the whole frame keeping its aspect ratio, then cut
    the overflow equally from both sides (centred crop). Nothing is stretched; an image of the
    job's aspect loses nothing. Transparent pixels become black (as the canny preprocessor sees
    them). Raises InputError for a bad size or an empty image."""
    if width < 1 or height < 1:
        raise InputError(f"control image size must be positive, got {width}x{height}")
    if image.width < 1 or image.height < 1:
        raise InputError(f"control image is empty ({image.width}x{image.height})")
    from ..inputs import fit  # the one resize rule of input photos, masks and control images
    from ..thumbs import _to_rgb

    image = _to_rgb(image, (0, 0, 0))
    return image if image.size == (width, height) else fit(image, width, height)


# -- pipelines --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ControlRequest:
    """One ControlNet unit of a `GenRequest`: the model's file, the control image already made
    (preprocessed, e.g. canny, and fitted to the request's size), its weight and its share of
    the steps, `start` to `end`. Requests of one batch share everything but the image."""

    model: str
    image: Any
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    @property
    def settings(self) -> tuple:
        return (str(self.model), float(self.weight), float(self.start), float(self.end))


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet in a render: `model` (from `load_controlnet`), `image` (a PIL image of the
    job's size, see `prepare_control_image`, or a list of them, one per image of the batch),
    `weight` (diffusers' `controlnet_conditioning_scale`: 0 = no effect, 1 = as trained), and the
    fraction of the denoising steps where it acts, `start` to `end` (diffusers'
    `control_guidance_start` / `control_guidance_end`, A1111's Guidance Start / End)."""

    model: Any
    image: Any
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0


def check_units(units: Sequence[ControlUnit]) -> None:
    """Raises InputError for no units, or a weight / start / end out of range."""
    if not units:
        raise InputError("a ControlNet render needs at least one unit")
    for i, u in enumerate(units):
        if not 0 <= u.start < u.end <= 1:
            raise InputError(f"ControlNet {i}: `start` and `end` must satisfy 0 <= start < end <= 1, got {u.start} and {u.end}")
        if not -10 <= u.weight <= 10:
            raise InputError(f"ControlNet {i}: `weight` must be between -10 and 10, got {u.weight}")


def controlnet_pipeline(pipe: Any, family: str, units: Sequence[ControlUnit], kind: str = "txt2img") -> tuple[Any, dict]:
    """The family's ControlNet pipeline of `kind` ("txt2img" | "img2img" | "inpaint") over the
    components of `pipe` (`from_pipe`: the same UNet, VAE, text encoders and scheduler object, no
    copy), and the keyword arguments that give it the units.

        cn_pipe, kw = controlnet_pipeline(engine.pipeline, engine.family, [ControlUnit(m, img, 0.8, 0, 0.8)])
        out = cn_pipe(prompt_embeds=..., width=, height=, generator=..., **kw)

    One unit passes its model and values as they are; several become a `MultiControlNetModel`
    with one value per unit (diffusers adds their residuals). The pipeline is a new object each
    call (cheap: it holds references); set its scheduler before calling it.
    Raises InputError for an unknown kind or bad unit values (`check_units`)."""
    import diffusers

    if (family, kind) not in PIPELINE_CLASSES:
        kinds = sorted({k for _, k in PIPELINE_CLASSES})
        raise InputError(f"ControlNet pipeline kind must be one of {', '.join(kinds)} for sd15 or sdxl, got {family}/{kind}")
    check_units(units)
    from ..models import FAMILIES

    if len(units) == 1:
        net: Any = units[0].model
    else:
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        net = MultiControlNetModel([u.model for u in units])
    cls = getattr(diffusers, PIPELINE_CLASSES[(family, kind)])
    cn_pipe = cls.from_pipe(pipe, controlnet=net)
    for attr, value in FAMILIES[family].after_load:  # no safety checker, no watermark, as the base pipeline
        if hasattr(cn_pipe, attr):
            setattr(cn_pipe, attr, value)
    cn_pipe.set_progress_bar_config(disable=True)

    def per_unit(values: list) -> Any:
        return values[0] if len(units) == 1 else values

    kwargs = {
        "image" if kind == "txt2img" else "control_image": per_unit([u.image for u in units]),
        "controlnet_conditioning_scale": per_unit([float(u.weight) for u in units]),
        "control_guidance_start": per_unit([float(u.start) for u in units]),
        "control_guidance_end": per_unit([float(u.end) for u in units]),
    }
    return cn_pipe, kwargs
