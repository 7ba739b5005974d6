"""`open_engine`: turn a model reference into a ready `Engine`, with no network by default.

A model reference is one of:
- `builtin:<name>` (see `builtin.BUILTIN_MODELS`),
- a single-file `.safetensors` checkpoint in the A1111/ComfyUI layout (SD1.5 or SDXL base),
  loaded with the component configs and tokenizer shipped in `imagegen/data` (no hub, no cache),
- a diffusers folder (with `model_index.json`),
- a Hugging Face hub id, only with `allow_download=True`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..defaults import DTYPE_SHORT
from ..devices import resolve_device, resolve_dtype
from ..errors import InputError, ModelError
from ..models import FAMILIES as FAMILY_RECORDS
from ..models import FAMILY_BY_PIPELINE
from . import builtin
from ..modelfiles import FAMILIES, INPAINT_CHANNELS, detect_model
from .engine import Engine, _one_line



def go_offline() -> None:
    """Make the Hugging Face libraries refuse network access for this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import sys

    # The libraries read these variables when first imported; patch the live values too.
    for mod_name, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("huggingface_hub.constants", "HF_HUB_DISABLE_TELEMETRY"),
        ("diffusers.utils.constants", "HF_HUB_OFFLINE"),
    ):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            setattr(mod, attr, True)


def go_online() -> None:
    """Undo `go_offline` (for `allow_download`)."""
    import sys

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(var, None)
    for mod_name in ("huggingface_hub.constants", "diffusers.utils.constants"):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, "HF_HUB_OFFLINE"):
            setattr(mod, "HF_HUB_OFFLINE", False)


def _load_vae(vae: str, family: str, torch_dtype: Any, config_dir: Path):
    from diffusers import AutoencoderKL

    p = Path(vae).expanduser()
    try:
        if p.is_dir():
            sub = "vae" if (p / "vae" / "config.json").is_file() else None
            if sub is None and not (p / "config.json").is_file():
                raise ModelError(f"VAE {p}: folder has neither `config.json` nor `vae/config.json`")
            return AutoencoderKL.from_pretrained(str(p), subfolder=sub, torch_dtype=torch_dtype, local_files_only=True)
        if p.is_file():
            if p.suffix.lower() != ".safetensors":
                raise ModelError(f"VAE {p}: only `.safetensors` files or diffusers folders are supported")
            return AutoencoderKL.from_single_file(
                str(p), config=str(config_dir), subfolder="vae", torch_dtype=torch_dtype, local_files_only=True
            )
    except ModelError:
        raise
    except Exception as e:  # diffusers' own error classes included
        raise ModelError(f"VAE {p}: cannot load as a {family} VAE: {_one_line(e)}") from None
    raise ModelError(f"VAE {p}: file not found")


def _pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, FAMILY_RECORDS[family].pipeline_class)


def _extra_kwargs(family: str) -> dict:
    return dict(FAMILY_RECORDS[family].load_kwargs)


def _variant(folder: Path) -> str | None:
    unet = folder / "unet"
    if unet.is_dir() and not any(unet.glob("diffusion_pytorch_model.safetensors")) and any(unet.glob("*.fp16.*")):
        return "fp16"
    return None


def open_engine(
    checkpoint: str,
    *,
    family: str = "auto",
    vae: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    allow_download: bool = False,
    _config_dir: str | Path | None = None,
) -> Engine:
    """Load `checkpoint` (builtin:<name>, .safetensors single file, diffusers folder, or a hub
    id with `allow_download`) into an `Engine` on `device` (default: cuda if available, else cpu)
    in `dtype` (default: fp16 on GPU, fp32 on CPU), with an optional separate `vae`.

    Nothing touches the network unless `allow_download` is true (the hub is put offline).
    `_config_dir` (tests) replaces the shipped component configs used for single files.

    An inpainting checkpoint (9-channel UNet) loads too; its `Engine.inpainting` is True and it
    renders requests with an input photo only.

    Raises ModelError for missing or unsupported models (SD2, SD3, Flux, refiner, unknown layouts) or a `family` that disagrees with the file; InputError for a bad device,
    dtype or family name.
    """
    if allow_download:
        go_online()
    else:
        go_offline()
    import torch

    builtin.quiet()
    if family not in ("auto", *FAMILIES):
        raise InputError(f"`family` must be auto, {' or '.join(FAMILIES)}; got {family!r}")
    dev = resolve_device(device)
    dt_name = resolve_dtype(dtype, dev)
    torch_dtype = getattr(torch, dt_name)
    ref = str(checkpoint)

    # 1. Find what the reference points at, and its family.
    kind, model_name, inpainting = "", "", False
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
        if name not in builtin.BUILTIN_MODELS:
            raise ModelError(f"unknown builtin model {ref!r}; available: "
                             + ", ".join("builtin:" + n for n in builtin.BUILTIN_MODELS))  # fmt: skip
        found, kind, model_name = builtin.BUILTIN_FAMILY[name], "builtin", ref
    else:
        path = Path(ref).expanduser()
        if path.exists():
            found, inpainting = detect_model(path)  # an inpainting model renders photo requests only (Engine)
            kind = "folder" if path.is_dir() else "file"
            model_name = path.name if path.is_dir() else path.stem
        elif _looks_like_hub_id(ref):
            if not allow_download:
                raise ModelError(
                    f"model {ref!r} is not a local file or folder; Hugging Face hub ids need `--allow-download` "
                    "(or give the path of a .safetensors file or diffusers folder)"
                )
            kind, model_name, found = "hub", ref, ""
        else:
            raise ModelError(f"{path}: file not found")
    if found and family != "auto" and family != found:
        raise ModelError(f"{ref}: `family` is {family!r} but the model is {found}")
    fam = found

    # 2. Load the pipeline. (`torch_dtype` works on every supported diffusers; newer ones warn.)
    cfg_dir = Path(_config_dir) if _config_dir else builtin.CONFIG_DIR / (fam or "sd15")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        vae_obj = _load_vae(vae, fam or "sd15", torch_dtype, cfg_dir) if vae else None
        try:
            pipe, fam = _load_pipeline(kind, ref, fam, dev, torch_dtype, cfg_dir, vae_obj, inpainting)
        except ModelError:
            raise
        except Exception as e:  # diffusers raises its own classes too (SingleFileComponentError, ...)
            raise ModelError(f"{ref}: cannot load as {fam or 'a model'}: {_one_line(e)}") from None
    if family != "auto" and family != fam:
        raise ModelError(f"{ref}: `family` is {family!r} but the model is {fam}")

    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return Engine(pipe, family=fam, device=dev, dtype=DTYPE_SHORT[dt_name], model_name=model_name)


def _load_pipeline(kind: str, ref: str, fam: str, dev: str, torch_dtype: Any, cfg_dir: Path, vae_obj: Any,
                   inpainting: bool = False):
    extra: dict[str, Any] = {"vae": vae_obj} if vae_obj is not None else {}
    if kind == "builtin":
        name = ref.split(":", 1)[1]
        if name in builtin.TINY_CONFIGS:
            folder = builtin.tiny_folder(name)
            pipe = _pipeline_class(fam).from_pretrained(
                str(folder), torch_dtype=torch_dtype, local_files_only=True, **_extra_kwargs(fam), **extra
            )
        else:  # trained demo weights, or full-size random ones, built in memory on the device
            parts = builtin.demo_components(dev) if name == "demo-sd15" else builtin.build_components(name, device=dev)
            parts.update(extra)
            pipe = builtin.make_pipeline(fam, parts)
            pipe.to(dtype=torch_dtype)
        return pipe, fam
    if kind == "file":
        extra.update(_bare_clip_text_encoder(ref, cfg_dir, torch_dtype))
        if inpainting:  # the shipped UNet config has 4 input channels; an inpainting UNet takes 9
            from diffusers import UNet2DConditionModel

            extra["unet"] = UNet2DConditionModel.from_single_file(
                ref, config=str(cfg_dir), subfolder="unet", in_channels=INPAINT_CHANNELS, local_files_only=True,
                torch_dtype=torch_dtype)
        pipe = _pipeline_class(fam).from_single_file(
            ref, config=str(cfg_dir), local_files_only=True, torch_dtype=torch_dtype,
            **builtin.tokenizers(fam), **_extra_kwargs(fam), **extra,
        )  # fmt: skip
        return pipe, fam
    if kind == "folder":
        pipe = _pipeline_class(fam).from_pretrained(
            ref, torch_dtype=torch_dtype, local_files_only=True, variant=_variant(Path(ref)),
            **_extra_kwargs(fam), **extra,
        )  # fmt: skip
        return pipe, fam
    # a hub id, downloads allowed
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(ref, torch_dtype=torch_dtype, **extra)
    cls = type(pipe).__name__
    fam = FAMILY_BY_PIPELINE.get(cls, "")
    if not fam:
        raise ModelError(f"{ref}: unsupported pipeline `{cls}`; supported: SD1.5 and SDXL base")
    for attr, value in FAMILY_RECORDS[fam].after_load:
        setattr(pipe, attr, value)
    return pipe, fam


def _bare_clip_text_encoder(ref: str, cfg_dir: Path, torch_dtype: Any) -> dict:
    """{"text_encoder": model} when the file stores CLIP-L without the `text_model.` level
    (transformers-5 layout), which diffusers' single-file loader does not recognise; else {}.
    Only the CLIP-L tensors are read here; diffusers loads the rest as usual."""
    from ..modelfiles import bare_clip_prefix, read_safetensors_shapes

    prefix = bare_clip_prefix(read_safetensors_shapes(ref))
    if prefix is None:
        return {}
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    with safe_open(ref, framework="pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix) and not k.endswith("position_ids")}
    config = CLIPTextConfig.from_pretrained(str(cfg_dir / "text_encoder"), local_files_only=True)
    model = CLIPTextModel(config)
    missing, unexpected = _load_text_state(model, sd)
    if missing or unexpected:
        raise ModelError(f"{ref}: its CLIP text encoder (under `{prefix}`) does not fit the {cfg_dir.name} layout: "
                         f"{len(missing)} missing, {len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[0]})")
    return {"text_encoder": model.to(dtype=torch_dtype).eval()}


def _load_text_state(model: Any, sd: dict) -> tuple[list[str], list[str]]:
    """Load CLIP weights whichever side has the `text_model.` level; (missing, unexpected)."""
    want = set(model.state_dict())
    wrapped = any(k.startswith("text_model.") for k in want)
    fixed = {("text_model." + k if wrapped and not k.startswith("text_model.") else k): v for k, v in sd.items()}
    result = model.load_state_dict(fixed, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    return missing, list(result.unexpected_keys)


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not ref.startswith((".", "~"))
        and not Path(ref).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin")
    )
