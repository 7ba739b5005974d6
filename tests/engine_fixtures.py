"""Builders for engine tests (importable by any test): tiny LoRA files and A1111-layout
single-file checkpoints made from the tiny built-in models, plus fake key sets for detection.

diffusers only converts A1111/LDM checkpoints *to* its own layout; the reverse mapping below
is ours, written from the published key layouts (LDM `model.diffusion_model.input_blocks...`,
`first_stage_model.encoder.down...`, CLIP-L under `cond_stage_model.transformer` or
`conditioner.embedders.0.transformer`, OpenCLIP-G under `conditioner.embedders.1.model`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TINY = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}


def tiny_folder(family: str) -> Path:
    """The cached diffusers folder of the tiny model of `family` (built on first use)."""
    from imagegen.engine.builtin import tiny_folder as _tiny

    return _tiny(TINY[family])


def _load_dir(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, f"expected one weight file in {folder}, found {files}"
    return load_file(str(files[0]))


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --- diffusers -> LDM (A1111) keys ----------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attn: set[int]) -> str:
    """One diffusers UNet2DConditionModel key to its `model.diffusion_model.` LDM name."""
    n = layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    for d, ldm in fixed.items():
        if key.startswith(d + "."):
            return ldm + key[len(d) :]

    def resnet(rest: str) -> str:
        name, _, tail = rest.partition(".")
        return f"{_RESNET[name]}.{tail}"

    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{n * i + j + 1}.0.{resnet(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{n * i + j + 1}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{n * i + j}.0.{resnet(rest)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{n * i + j}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{n * i + layers_per_block}.{2 if i in up_has_attn else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """A diffusers UNet state dict in the A1111 layout (`model.diffusion_model.` prefix)."""
    up_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    lpb = config["layers_per_block"]
    return {"model.diffusion_model." + unet_key_to_ldm(k, lpb, up_attn): v for k, v in sd.items()}


def vae_to_ldm(sd: dict, config: dict, prefix: str = "first_stage_model.") -> dict:
    """A diffusers AutoencoderKL state dict in the LDM layout (attention as 1x1 convs)."""
    n_up = len(config["up_block_types"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        new = k.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", new):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and v.ndim == 2:
                v = v[:, :, None, None]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", new):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", new):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", new):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        out[prefix + new.replace("conv_shortcut", "nin_shortcut")] = v
    return out


def _hf_text_keys(sd: dict) -> dict:
    """transformers >= 5.6 saves CLIPTextModel without the `text_model.` level; put it back."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def clip_to_ldm(sd: dict, prefix: str, text_model_level: bool = True) -> dict:
    """CLIP-L in its HF layout under `prefix` (as SD1.x and SDXL single files store it); without
    `text_model_level`, in the transformers-5 layout (no `text_model.` level)."""
    if not text_model_level:
        return {prefix + k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    return {prefix + k: v for k, v in _hf_text_keys(sd).items() if not k.endswith("position_ids")}


def open_clip_to_ldm(sd: dict, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """An HF CLIPTextModelWithProjection in the OpenCLIP layout (fused qkv, transposed projection)."""
    import torch

    sd = _hf_text_keys(sd)
    out = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
            out[f"{prefix}transformer.resblocks.{m[1]}.{names[m[2]]}.{m[3]}"] = v
        else:
            raise KeyError(f"no OpenCLIP name for {k}")
    for (i, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def make_single_file(path: str | Path, family: str, folder: str | Path | None = None, text_model_level: bool = True) -> Path:
    """Write the tiny model of `family` (or the diffusers `folder`) as one A1111-layout
    `.safetensors` file. Load it with `open_engine(path, _config_dir=<the folder>)`.
    `text_model_level=False` writes CLIP-L without the `text_model.` level (transformers-5 layout)."""
    from safetensors.torch import save_file

    src = Path(folder) if folder else tiny_folder(family)
    sd = unet_to_ldm(_load_dir(src / "unet"), _config(src / "unet"))
    sd.update(vae_to_ldm(_load_dir(src / "vae"), _config(src / "vae")))
    if family == "sdxl":
        sd.update(clip_to_ldm(_load_dir(src / "text_encoder"), "conditioner.embedders.0.transformer.", text_model_level))
        sd.update(open_clip_to_ldm(_load_dir(src / "text_encoder_2")))
    else:
        sd.update(clip_to_ldm(_load_dir(src / "text_encoder"), "cond_stage_model.transformer.", text_model_level))
    path = Path(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# --- LoRAs ----------------------------------------------------------------------------------


def _lora_targets(family: str) -> dict[str, list[tuple[str, tuple[int, int]]]]:
    """Linear layers a LoRA trainer targets, per component: (module path, (out, in))."""
    from imagegen.modelfiles import read_safetensors_shapes

    src = tiny_folder(family)
    comps = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}
    if family == "sdxl":
        comps["text_encoder_2"] = "text_encoder_2/model.safetensors"
    pat = {
        "unet": re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$"),
        "text_encoder": re.compile(r"self_attn\.(q|k|v|out)_proj\.weight$"),
    }
    out = {}
    for comp, rel in comps.items():
        shapes = read_safetensors_shapes(src / rel)
        p = pat["unet" if comp == "unet" else "text_encoder"]
        items = []
        for k, s in sorted(shapes.items()):
            if p.search(k):
                mod = k[: -len(".weight")]
                if comp != "unet" and not mod.startswith("text_model."):
                    mod = "text_model." + mod
                items.append((mod, (s[0], s[1])))
        out[comp] = items
    return out


def make_tiny_lora(
    path: str | Path,
    family: str,
    rank: int = 4,
    seed: int = 0,
    fmt: str = "kohya",
    text_encoder: bool = True,
    scale: float = 0.5,
    relative: float | None = None,
) -> Path:
    """A random LoRA for the tiny `family` model, as a `.safetensors` file.

    fmt "kohya": `lora_unet_*` / `lora_te_*` (SDXL: `lora_te1_*`, `lora_te2_*`, and the UNet in
    the A1111 `input_blocks` naming kohya uses for SDXL) with `lora_down`/`lora_up`/`alpha`;
    fmt "diffusers": peft keys `unet.<module>.lora_A.weight` / `lora_B.weight`.
    Up weights are non-zero (random, `scale`) so the LoRA visibly changes images. With
    `scale` 0.5 each layer's change is many times the layer's own weights: a deliberately
    strong LoRA that makes the tiny random models chaotic (see `make_realistic_lora`).
    `relative`, when given, replaces `scale`: each layer's change at weight 1 has that fraction
    of the layer's weight norm (Frobenius), as in trained LoRAs.
    """
    import torch
    from safetensors.torch import save_file

    if fmt not in ("kohya", "diffusers"):
        raise ValueError(fmt)
    g = torch.Generator().manual_seed(seed)
    targets = _lora_targets(family)
    if not text_encoder:
        targets = {"unet": targets["unet"]}
    unet_cfg = _config(tiny_folder(family) / "unet")
    up_attn = {i for i, t in enumerate(unet_cfg["up_block_types"]) if "CrossAttn" in t}
    te_prefix = {"text_encoder": "lora_te_" if family == "sd15" else "lora_te1_", "text_encoder_2": "lora_te2_"}
    base = _base_weights(family, list(targets)) if relative is not None else {}
    sd = {}
    for comp, items in targets.items():
        for mod, (n_out, n_in) in items:
            down = torch.randn(rank, n_in, generator=g) * scale
            up = torch.randn(n_out, rank, generator=g) * scale
            if relative is not None:  # alpha = rank: the change at weight 1 is up @ down
                w = base[comp][mod]
                up = up * (relative * float(w.norm()) / float((up @ down).norm()))
            if fmt == "diffusers":
                sd[f"{comp}.{mod}.lora_A.weight"] = down
                sd[f"{comp}.{mod}.lora_B.weight"] = up
                continue
            if comp == "unet":
                name = mod
                if family == "sdxl":  # kohya SDXL LoRAs name UNet blocks the A1111 way
                    name = unet_key_to_ldm(mod + ".weight", unet_cfg["layers_per_block"], up_attn)[: -len(".weight")]
                key = "lora_unet_" + name.replace(".", "_")
            else:
                key = te_prefix[comp] + mod.replace(".", "_")
            sd[key + ".lora_down.weight"] = down
            sd[key + ".lora_up.weight"] = up
            sd[key + ".alpha"] = torch.tensor(float(rank))
    path = Path(path)
    save_file(sd, str(path))
    return path


# Fraction of each layer's weight norm that a realistic LoRA changes at weight 1, per family:
# enough to move a tiny 64 px render by a few tens of levels (tiny SD1.5 is the less sensitive).
REALISTIC_STRENGTH = {"sd15": 0.3, "sdxl": 0.15}


def make_realistic_lora(
    path: str | Path,
    family: str,
    strength: float | None = None,
    rank: int = 4,
    seed: int = 0,
    fmt: str = "kohya",
    text_encoder: bool = True,
) -> Path:
    """A random LoRA scaled like a trained one: each layer's change at weight 1 is `strength`
    (default `REALISTIC_STRENGTH[family]`) of the layer's own weight norm. On the tiny models weight 1 changes a render
    by tens of levels out of 255, and the stability probe (imagegen.engine.stability) finds the
    model well-conditioned with it: 1e-6 perturbations move no pixel by more than 1/255.
    Formats and keys as `make_tiny_lora`."""
    return make_tiny_lora(path, family, rank=rank, seed=seed, fmt=fmt, text_encoder=text_encoder,
                          relative=REALISTIC_STRENGTH[family] if strength is None else strength)


def _base_weights(family: str, comps: list[str]) -> dict[str, dict[str, "object"]]:
    """{component: {module path as in `_lora_targets`: weight tensor}} of the tiny model."""
    src = tiny_folder(family)
    out = {}
    for comp in comps:
        sd = _load_dir(src / comp)
        if comp != "unet":
            sd = _hf_text_keys(sd)
        out[comp] = {k[: -len(".weight")]: v for k, v in sd.items() if k.endswith(".weight")}
    return out


# --- fake key sets for detection ------------------------------------------------------------


def write_fake_safetensors(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A valid `.safetensors` file with the given tensor names and shapes (zeros, tiny shapes
    welcome): detection reads names and shapes only."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


def fake_checkpoint_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """Key sets for detection tests, the widths detection reads (last dims) as in the real
    models, first dims shrunk so that the files stay small. For
    kind in sd15, sdxl, sd2, inpaint, refiner, sd3, flux, unknown."""
    u = "model.diffusion_model."
    te = "cond_stage_model.transformer.text_model."
    base = {u + "input_blocks.0.0.weight": (8, 4, 3, 3), u + "out.2.weight": (4, 8, 3, 3)}
    if kind == "sd15":
        return {**base, u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768),
                te + "embeddings.token_embedding.weight": (8, 768),
                "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3)}  # fmt: skip
    if kind == "inpaint":
        s = fake_checkpoint_shapes("sd15")
        s[u + "input_blocks.0.0.weight"] = (8, 9, 3, 3)
        return s
    if kind == "sd2":
        return {**base, u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024),
                "cond_stage_model.model.token_embedding.weight": (8, 1024)}  # fmt: skip
    if kind == "sdxl":
        return {**base, u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048),
                u + "label_emb.0.0.weight": (8, 2816),
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (8, 768),
                "conditioner.embedders.1.model.token_embedding.weight": (8, 1280)}  # fmt: skip
    if kind == "refiner":
        return {**base, u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 1280),
                u + "label_emb.0.0.weight": (8, 2560),
                "conditioner.embedders.0.model.token_embedding.weight": (8, 1280)}  # fmt: skip
    if kind == "sd3":
        return {u + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
                "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}  # fmt: skip
    if kind == "flux":
        return {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (8, 64)}
    if kind == "unknown":
        return {"foo.weight": (3, 3), "bar.bias": (3,)}
    raise ValueError(kind)
