"""Built-in random-weight models, so that recipes, tests and benchmarks run with no download.

- `builtin:tiny-sd15`, `builtin:tiny-sdxl`: a few hundred thousand weights in the real component
  classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel / CLIPTextModelWithProjection, the
  real CLIP tokenizer), built from a fixed seed and cached as a diffusers folder under the user
  cache. The VAE downsamples 8x like the real one. Images are coloured noise; they exist to
  exercise the real code paths on a CPU in seconds.
- `builtin:demo-sd15`: a small SD1.5-architecture model *trained* by `tools/train_demo.py` on
  drawn scenes (one shape, twelve colours, a 3x3 grid of positions; see `imagegen.demo_scenes`),
  32x32 pixels. Its weights ship in `imagegen/data/demo/` (float16, cast to float32 on load) and
  are built in memory: no cache folder, no download. It draws what its prompt says.
- `builtin:sd15-arch`, `builtin:sdxl-arch`: the full-size SD1.5 / SDXL architectures from the
  shipped configs, with random weights, built in memory on the target device (nothing is cached).
  For GPU speed measurements only: their images are noise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..defaults import cache_root
from ..models import BUILTIN_FAMILY, BUILTIN_MODELS  # the names live in the torch-free table

TINY_SEED = 20240607  # fixed: the tiny weights (and so every test image) depend on it
TINY_VERSION = 1  # bump when the tiny configs below change; names the cache folder

DATA = Path(__file__).resolve().parent.parent / "data"
TOKENIZER_DIR = DATA / "clip-tokenizer"
CONFIG_DIR = DATA / "configs"
DEMO_DIR = DATA / "demo"  # builtin:demo-sd15 (unet/, vae/, text_encoder/), its LoRA and upscaler


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# Tiny component configs. Block layout mirrors the real models (SD1.5: attention in the first
# down block, none in the last; SDXL: none in the first, 2-deep transformers after, text_time
# size conditioning, two text encoders of different widths) so key names and LoRA targets look
# like the real ones.
_TINY_TEXT = {
    "vocab_size": 49408,  # the real tokenizer, so real prompts tokenize as in SD
    "max_position_embeddings": 77,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,  # >= 2 so clip_skip has a layer to skip
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "projection_dim": 32,
}
_TINY_VAE = {
    "block_out_channels": [8, 16, 32, 32],  # 4 blocks: 8x down like the real VAE
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-sd15": {
        "unet": {
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "in_channels": 4,
            "out_channels": 4,
            "sample_size": 16,
        },
        "vae": {**_TINY_VAE, "scaling_factor": 0.18215},
        "text_encoder": _TINY_TEXT,
    },
    "tiny-sdxl": {
        "unet": {
            "block_out_channels": [32, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2],
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
            "cross_attention_dim": 32 + 48,  # both text encoders' widths, concatenated
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 48,  # 6 size ids + pooled text 2
            "norm_num_groups": 32,
            "in_channels": 4,
            "out_channels": 4,
            "sample_size": 16,
        },
        "vae": {**_TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": _TINY_TEXT,
        # Different width from text_encoder, as in the real model (768 vs 1280).
        "text_encoder_2": {**_TINY_TEXT, "hidden_size": 48, "projection_dim": 48, "hidden_act": "gelu"},
    },
}


def quiet() -> None:
    """No progress bars or info logs from diffusers/transformers: library code never prints."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _tokenizer(pad_token: str | None = None):
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **kwargs)


def tokenizers(family: str) -> dict[str, Any]:
    """The shipped CLIP tokenizer(s) as pipeline components (SDXL's second one pads with "!")."""
    out = {"tokenizer": _tokenizer()}
    if family == "sdxl":
        out["tokenizer_2"] = _tokenizer("!")
    return out


def _scheduler(family: str):
    import diffusers

    cfg = _read(CONFIG_DIR / family / "scheduler" / "scheduler_config.json")
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


def build_components(name: str, device: str = "cpu") -> dict[str, Any]:
    """Fresh random-weight components for builtin `name`, seeded, on `device`, in float32."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = BUILTIN_FAMILY[name]
    if name in TINY_CONFIGS:
        cfgs = TINY_CONFIGS[name]
    else:
        folder = CONFIG_DIR / family
        cfgs = {c: _read(folder / c / "config.json") for c in ("unet", "vae", "text_encoder")}
        if family == "sdxl":
            cfgs["text_encoder_2"] = _read(folder / "text_encoder_2" / "config.json")
    parts: dict[str, Any] = {}
    with torch.device(device):
        torch.manual_seed(TINY_SEED)
        parts["unet"] = UNet2DConditionModel(**_init_args(cfgs["unet"]))
        torch.manual_seed(TINY_SEED + 1)
        parts["vae"] = AutoencoderKL(**_init_args(cfgs["vae"]))
        torch.manual_seed(TINY_SEED + 2)
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**_init_args(cfgs["text_encoder"])))
        if family == "sdxl":
            torch.manual_seed(TINY_SEED + 3)
            te2 = CLIPTextConfig(**_init_args(cfgs["text_encoder_2"]))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(te2)
    for m in parts.values():
        m.eval()
    parts.update(tokenizers(family))
    parts["scheduler"] = _scheduler(family)
    return parts


def demo_components(device: str = "cpu", folder: Path | None = None) -> dict[str, Any]:
    """The trained `builtin:demo-sd15` components from `folder` (default `DEMO_DIR`), in float32
    on `device`.

    Raises ModelError when the shipped weights are missing or do not fit their configs.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from imagegen.errors import ModelError

    builders = {
        "unet": (lambda c: UNet2DConditionModel(**c), "diffusion_pytorch_model.safetensors"),
        "vae": (lambda c: AutoencoderKL(**c), "diffusion_pytorch_model.safetensors"),
        "text_encoder": (lambda c: CLIPTextModel(CLIPTextConfig(**c)), "model.safetensors"),
    }
    parts: dict[str, Any] = {}
    for comp, (build, fname) in builders.items():
        sub = (folder or DEMO_DIR) / comp
        try:
            cfg = _init_args(_read(sub / "config.json"))
            state = {k: v.float() for k, v in load_file(str(sub / fname)).items()}
            torch.manual_seed(TINY_SEED)  # init values are all overwritten; seeded anyway
            model = build(cfg)
            model.load_state_dict(state)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"builtin:demo-sd15: cannot load its {comp} from {sub}: {str(e).splitlines()[0]}") from None
        parts[comp] = model.to(device).eval()
    parts.update(tokenizers("sd15"))
    parts["scheduler"] = _scheduler("sd15")
    return parts


def _init_args(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}


def make_pipeline(family: str, parts: dict[str, Any]):
    """A diffusers pipeline for `family` from components (SD1.5 without a safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def tiny_folder(name: str) -> Path:
    """The cached diffusers folder of a tiny builtin, building it first if needed.

    The build goes to a temporary folder next to the final one and is renamed into place, so a
    crash or a concurrent build never leaves a half-written model behind.
    """
    if name not in TINY_CONFIGS:
        raise KeyError(name)
    root = cache_root() / "builtin"
    final = root / f"{name}-v{TINY_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    quiet()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        pipe = make_pipeline(BUILTIN_FAMILY[name], build_components(name))
        pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():  # lost a race to a complete build: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
