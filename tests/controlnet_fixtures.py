"""Tiny random ControlNets for tests, made from the tiny built-in UNets, and written to
`.safetensors` in the diffusers layout or the original ControlNet (LDM) layout.

diffusers only converts LDM ControlNets *to* its own names; the reverse mapping below is ours,
written from the published layout of lllyasviel's ControlNet files: the UNet encoder under
`input_blocks.*` / `middle_block.*` / `time_embed.*` / `label_emb.*` (the UNet's LDM names,
`engine_fixtures.unet_key_to_ldm`), the zero convolutions `zero_convs.{i}.0` and
`middle_block_out.0`, and the hint encoder `input_hint_block.{0,2,...,14}` (convolutions at the
even places, SiLU between), all optionally under `control_model.`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from engine_fixtures import tiny_folder, unet_key_to_ldm

STRENGTH = 0.3  # std of the random zero-conv weights: a visible change at weight 1, no blow-up


def tiny_unet(family: str) -> Any:
    """The tiny built-in UNet of `family` (float32, CPU)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_folder(family)), subfolder="unet", local_files_only=True)


def make_tiny_controlnet(family: str, seed: int = 0, strength: float = STRENGTH) -> Any:
    """A ControlNetModel copied from the tiny `family` UNet (`from_unet`) whose zero convolutions
    (and the hint encoder's last conv), zero in a fresh ControlNet, are random: it changes images."""
    import torch
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(tiny_unet(family))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")):
                p.copy_(torch.randn(p.shape, generator=g) * strength)
    return net.eval()


def controlnet_to_ldm(sd: dict, layers_per_block: int, prefix: str = "control_model.") -> dict:
    """A diffusers ControlNet state dict in the original ControlNet layout under `prefix`."""
    out = {}
    for k, v in sd.items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(weight|bias)$", k):
            new = f"zero_convs.{m[1]}.0.{m[2]}"
        elif m := re.match(r"controlnet_mid_block\.(weight|bias)$", k):
            new = f"middle_block_out.0.{m[1]}"
        elif m := re.match(r"controlnet_cond_embedding\.conv_in\.(weight|bias)$", k):
            new = f"input_hint_block.0.{m[1]}"
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)$", k):
            new = f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
        elif m := re.match(r"controlnet_cond_embedding\.conv_out\.(weight|bias)$", k):
            n = len({b for b in sd if b.startswith("controlnet_cond_embedding.blocks.")}) // 2
            new = f"input_hint_block.{2 * (n + 1)}.{m[1]}"
        else:
            new = unet_key_to_ldm(k, layers_per_block, set())
        out[prefix + new] = v
    return out


def save_controlnet(net: Any, path: str | Path, layout: str = "diffusers", prefix: str = "control_model.") -> Path:
    """Write `net` as one `.safetensors` file in `layout` ("diffusers" | "ldm"; LDM keys under
    `prefix`, "" for the bare layout)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    if layout == "ldm":
        sd = controlnet_to_ldm(sd, net.config.layers_per_block, prefix)
    elif layout != "diffusers":
        raise ValueError(layout)
    path = Path(path)
    save_file(sd, str(path))
    return path
