"""SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3): `body.0` ... `body.K`, PReLU
weights at odd indices, optionally wrapped in `params_ema` / `params`. Width, conv count and
scale come from the shapes. Torch-free; the network is in `net.py`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from imagegen.upscale.archspec import Architecture, ArchSpec, LayoutMismatch, Shapes


def _match(keys: set[str]) -> str | None:
    return "compact" if "body.0.weight" in keys and "body.1.weight" in keys else None


def _detect(shapes: Shapes, layout: str) -> ArchSpec:
    idx = sorted({int(m[1]) for k in shapes if (m := re.fullmatch(r"body\.(\d+)\.weight", k))})
    if idx != list(range(len(idx))):
        raise LayoutMismatch(f"`body` indices are not contiguous: {idx[:8]}...")
    last = idx[-1]
    if last % 2 or last < 2:
        raise LayoutMismatch(f"last `body` index {last} is not a conv (expected an even index)")
    for i in idx:
        ndim = 4 if i % 2 == 0 else 1
        if len(shapes[f"body.{i}.weight"]) != ndim:
            raise LayoutMismatch(f"`body.{i}.weight` has shape {tuple(shapes[f'body.{i}.weight'])}, expected {ndim} dims")
    first = shapes["body.0.weight"]
    num_feat, in_ch = first[0], first[1]
    out = shapes[f"body.{last}.weight"][0]
    scale = math.isqrt(out // 3) if out % 3 == 0 else 0
    if in_ch != 3 or scale < 1 or 3 * scale * scale != out:
        raise LayoutMismatch(f"compact net with {in_ch} input and {out} output channels (expected 3 and 3*scale^2)")
    params = dict(num_feat=num_feat, num_conv=last // 2 - 1, scale=scale)
    return ArchSpec(arch="SRVGGNetCompact", layout="compact", scale=scale, params=params)


def _build(spec: ArchSpec) -> Any:
    from imagegen.upscale.archs.compact.net import SRVGGNetCompact

    return SRVGGNetCompact(**spec.kwargs)


def _describe(spec: ArchSpec) -> str:
    return f"SRVGGNetCompact x{spec.scale} ({spec.num_conv} convs, {spec.num_feat} feat)"


def _activation_bytes(spec: ArchSpec, item: int) -> int:
    return int(item * (3 * spec.num_feat + 4 * 3 * spec.scale * spec.scale) + 64)


ARCH = Architecture(
    name="SRVGGNetCompact",
    layouts=(("compact", "SRVGGNetCompact (body.0 ... body.K with PReLU weights at odd indices)"),),
    models=("realesr-general-x4v3", "realesr-animevideov3"),
    match=_match, detect=_detect, build=_build, describe=_describe, activation_bytes=_activation_bytes,
)
