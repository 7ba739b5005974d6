"""RRDBNet (ESRGAN / Real-ESRGAN x4plus, x2plus, anime_6B) in two key layouts:

- BasicSR: `conv_first`, `body.N.rdb1.conv1`, ..., `conv_body`, `conv_up1`, `conv_up2`,
  `conv_hr`, `conv_last`, optionally wrapped in `params_ema` / `params`;
- old ESRGAN: `model.0`, `model.1.sub.N.RDB1.conv1.0`, ..., `model.1.sub.<nb>`, upsample convs
  at `model.3`, `model.6`, ..., then HR conv and last conv.

Block count, width, growth channels, upsample stages and the pixel-unshuffle factor (x2 and x1
models) all come from the shapes. Torch-free; the network is in `net.py`.
"""

from __future__ import annotations

import re
from typing import Any

from imagegen.upscale.archspec import Architecture, ArchSpec, LayoutMismatch, Shapes

# Input channels of conv_first -> pixel-unshuffle factor (Real-ESRGAN x2 and x1 models).
_UNSHUFFLE_BY_IN_CH = {3: 1, 12: 2, 48: 4}


def _need(shapes: Shapes, key: str, ndim: int) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise LayoutMismatch(f"missing key `{key}`")
    if len(shape) != ndim:
        raise LayoutMismatch(f"`{key}` has shape {tuple(shape)}, expected {ndim} dims")
    return tuple(shape)


def esrgan_to_basicsr(name: str, num_block: int, num_up: int) -> str | None:
    """Rename one old-ESRGAN key to its BasicSR name (None when it has no counterpart)."""
    m = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", name)
    if m:
        return f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
    m = re.fullmatch(r"model\.1\.sub\.(\d+)\.(weight|bias)", name)
    if m and int(m[1]) == num_block:
        return f"conv_body.{m[2]}"
    m = re.fullmatch(r"model\.(\d+)\.(weight|bias)", name)
    if not m:
        return None
    idx, kind = int(m[1]), m[2]
    if idx == 0:
        return f"conv_first.{kind}"
    # Each upsample stage is (Upsample, conv, LeakyReLU): convs at 3, 6, ..., 3 * num_up.
    if idx % 3 == 0 and 1 <= idx // 3 <= num_up:
        return f"conv_up{idx // 3}.{kind}"
    if idx == 3 * num_up + 2:
        return f"conv_hr.{kind}"
    if idx == 3 * num_up + 4:
        return f"conv_last.{kind}"
    return None


def _match(keys: set[str]) -> str | None:
    if "conv_first.weight" in keys:
        return "basicsr"
    if "model.0.weight" in keys and any(k.startswith("model.1.sub.") for k in keys):
        return "esrgan"
    return None


def _detect(shapes: Shapes, layout: str) -> ArchSpec:
    if layout == "esrgan":
        blocks = {int(m[1]) for k in shapes if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB1\.", k))}
        num_block = len(blocks)
        if blocks != set(range(num_block)):
            raise LayoutMismatch(f"RRDB blocks are not numbered 0..{num_block - 1}")
        ups = sorted(
            int(m[1])
            for k in shapes
            if (m := re.fullmatch(r"model\.(\d+)\.weight", k)) and int(m[1]) >= 2
        )
        # convs after the trunk: up convs at 3, 6, ..., HR conv at 3n+2, last conv at 3n+4.
        num_up = (len(ups) - 2) if len(ups) >= 2 else 0
        if num_up < 1 or ups != [3 * i for i in range(1, num_up + 1)] + [3 * num_up + 2, 3 * num_up + 4]:
            raise LayoutMismatch(f"unexpected trunk conv indices {ups}")
        renamed = {}
        for k, v in shapes.items():
            new = esrgan_to_basicsr(k, num_block, num_up)
            if new is None:
                raise LayoutMismatch(f"unexpected key `{k}` in old ESRGAN layout")
            renamed[new] = v
        shapes = renamed
    else:
        num_block = len({int(m[1]) for k in shapes if (m := re.match(r"body\.(\d+)\.rdb1\.", k))})
        num_up = len([k for k in shapes if re.fullmatch(r"conv_up\d+\.weight", k)])
    first = _need(shapes, "conv_first.weight", 4)
    last = _need(shapes, "conv_last.weight", 4)
    grow = _need(shapes, "body.0.rdb1.conv1.weight", 4) if num_block else (0,)
    num_feat, in_ch = first[0], first[1]
    if in_ch not in _UNSHUFFLE_BY_IN_CH:
        raise LayoutMismatch(f"`conv_first` takes {in_ch} input channels; expected 3, 12 or 48")
    if last[0] != 3:
        raise LayoutMismatch(f"`conv_last` gives {last[0]} output channels; expected 3 (RGB)")
    if num_block == 0 or num_up == 0:
        raise LayoutMismatch("no RRDB blocks or no upsample convs")
    unshuffle = _UNSHUFFLE_BY_IN_CH[in_ch]
    if (2**num_up) % unshuffle:
        raise LayoutMismatch(f"{num_up} upsample stages with pixel-unshuffle {unshuffle}")
    params = dict(num_feat=num_feat, num_block=num_block, num_grow=grow[0], num_up=num_up, unshuffle=unshuffle)
    return ArchSpec(arch="RRDBNet", layout=layout, scale=2**num_up // unshuffle, params=params, pad_multiple=unshuffle)


def _convert(state: dict[str, Any], spec: ArchSpec) -> dict[str, Any]:
    if spec.layout != "esrgan":
        return state
    return {esrgan_to_basicsr(k, spec.num_block, spec.num_up) or k: v for k, v in state.items()}


def _build(spec: ArchSpec) -> Any:
    from imagegen.upscale.archs.rrdbnet.net import RRDBNet

    return RRDBNet(**spec.kwargs)


def _describe(spec: ArchSpec) -> str:
    extra = f", pixel-unshuffle {spec.unshuffle}" if spec.unshuffle > 1 else ""
    return (
        f"RRDBNet x{spec.scale} ({spec.num_block} blocks, {spec.num_feat} feat, "
        f"{spec.num_grow} grow{extra}; {spec.layout} layout)"
    )


def _activation_bytes(spec: ArchSpec, item: int) -> int:
    body = (spec.num_feat * 2 + 4 * spec.num_grow) / (spec.unshuffle * spec.unshuffle)
    # The widest tensors sit at output resolution: upsampled features, conv out, hr conv.
    return int(item * max(body, 3 * spec.num_feat * spec.scale * spec.scale) + 64)


ARCH = Architecture(
    name="RRDBNet",
    layouts=(
        ("basicsr", "BasicSR RRDBNet (conv_first, body.N.rdb1.conv1, conv_body, conv_up1, conv_hr, conv_last)"),
        ("esrgan", "old ESRGAN RRDBNet (model.0, model.1.sub.N.RDB1.conv1.0, model.3, ...)"),
    ),
    models=("RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B", "ESRGAN (old layout)"),
    match=_match, detect=_detect, build=_build, describe=_describe, activation_bytes=_activation_bytes,
    convert=_convert,
)
