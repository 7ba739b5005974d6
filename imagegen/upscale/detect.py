"""Recognise a Real-ESRGAN / ESRGAN weight file from its key names and tensor shapes.

Works on a mapping `name -> shape` so it needs no torch. Understood layouts, in order:

1. BasicSR RRDBNet (`conv_first`, `body.N.rdb1.conv1`, ..., `conv_body`, `conv_up1`, `conv_up2`,
   `conv_hr`, `conv_last`), optionally wrapped in `params_ema` / `params`.
2. Old ESRGAN RRDBNet (`model.0`, `model.1.sub.N.RDB1.conv1.0`, ..., `model.1.sub.<nb>`,
   upsample convs at `model.3`, `model.6`, ..., then HR conv and last conv).
3. SRVGGNetCompact (`body.0` ... `body.K`, PReLU weights at odd indices), optionally wrapped.

Scale, block count, width and the pixel-unshuffle factor all come from the shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from imagegen.errors import ModelError

# The layouts we understand, quoted in the error for anything else.
LAYOUTS = (
    "BasicSR RRDBNet (conv_first, body.N.rdb1.conv1, conv_body, conv_up1, conv_hr, conv_last)",
    "old ESRGAN RRDBNet (model.0, model.1.sub.N.RDB1.conv1.0, model.3, ...)",
    "SRVGGNetCompact (body.0 ... body.K with PReLU weights at odd indices)",
)
# Input channels of conv_first -> pixel-unshuffle factor (Real-ESRGAN x2 and x1 models).
_UNSHUFFLE_BY_IN_CH = {3: 1, 12: 2, 48: 4}


@dataclass(frozen=True)
class ArchSpec:
    """What `detect` found: enough to build the network and to name it."""

    arch: str  # "RRDBNet" or "SRVGGNetCompact"
    layout: str  # "basicsr", "esrgan" or "compact"
    scale: int  # output pixels per input pixel along each side
    num_feat: int
    num_block: int = 0  # RRDBNet: RRDB count
    num_grow: int = 0  # RRDBNet: dense growth channels
    num_up: int = 0  # RRDBNet: x2 upsample stages
    unshuffle: int = 1  # RRDBNet: pixel-unshuffle factor of the input
    num_conv: int = 0  # SRVGGNetCompact: inner conv count
    kwargs: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def pad_multiple(self) -> int:
        """Input sides must be a multiple of this (the unshuffle factor)."""
        return self.unshuffle

    def describe(self) -> str:
        if self.arch == "RRDBNet":
            extra = f", pixel-unshuffle {self.unshuffle}" if self.unshuffle > 1 else ""
            return (
                f"RRDBNet x{self.scale} ({self.num_block} blocks, {self.num_feat} feat, "
                f"{self.num_grow} grow{extra}; {self.layout} layout)"
            )
        return f"SRVGGNetCompact x{self.scale} ({self.num_conv} convs, {self.num_feat} feat)"


def unwrap(state: Mapping[str, object]) -> Mapping[str, object]:
    """Take the weights out of a BasicSR `params_ema` / `params` wrapper and drop `module.`."""
    for wrapper in ("params_ema", "params", "state_dict"):
        inner = state.get(wrapper) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner:
            state = inner
            break
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _fail(path: str, why: str) -> ModelError:
    return ModelError(
        f"{path}: not a Real-ESRGAN/ESRGAN weight file ({why}); understood layouts: "
        + "; ".join(LAYOUTS)
    )


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, path: str) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise _fail(path, f"missing key `{key}`")
    if len(shape) != ndim:
        raise _fail(path, f"`{key}` has shape {tuple(shape)}, expected {ndim} dims")
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


def detect(shapes: Mapping[str, tuple[int, ...]], *, path: str = "weights") -> ArchSpec:
    """Find the architecture of an (unwrapped) state dict given as `name -> shape`.

    Raises `ModelError` naming the understood layouts when nothing matches.
    """
    keys = set(shapes)
    if "conv_first.weight" in keys:
        return _detect_rrdb(shapes, path=path, layout="basicsr")
    if "model.0.weight" in keys and any(k.startswith("model.1.sub.") for k in keys):
        return _detect_rrdb(shapes, path=path, layout="esrgan")
    if "body.0.weight" in keys and "body.1.weight" in keys:
        return _detect_compact(shapes, path=path)
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    raise _fail(path, f"unrecognised keys: {sample}")


def _detect_rrdb(shapes: Mapping[str, tuple[int, ...]], *, path: str, layout: str) -> ArchSpec:
    if layout == "esrgan":
        blocks = {int(m[1]) for k in shapes if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB1\.", k))}
        num_block = len(blocks)
        if blocks != set(range(num_block)):
            raise _fail(path, f"RRDB blocks are not numbered 0..{num_block - 1}")
        ups = sorted(
            int(m[1])
            for k in shapes
            if (m := re.fullmatch(r"model\.(\d+)\.weight", k)) and int(m[1]) >= 2
        )
        # convs after the trunk: up convs at 3, 6, ..., HR conv at 3n+2, last conv at 3n+4.
        num_up = (len(ups) - 2) if len(ups) >= 2 else 0
        if num_up < 1 or ups != [3 * i for i in range(1, num_up + 1)] + [3 * num_up + 2, 3 * num_up + 4]:
            raise _fail(path, f"unexpected trunk conv indices {ups}")
        renamed = {}
        for k, v in shapes.items():
            new = esrgan_to_basicsr(k, num_block, num_up)
            if new is None:
                raise _fail(path, f"unexpected key `{k}` in old ESRGAN layout")
            renamed[new] = v
        shapes = renamed
    else:
        num_block = len({int(m[1]) for k in shapes if (m := re.match(r"body\.(\d+)\.rdb1\.", k))})
        num_up = len([k for k in shapes if re.fullmatch(r"conv_up\d+\.weight", k)])
    first = _need(shapes, "conv_first.weight", 4, path)
    last = _need(shapes, "conv_last.weight", 4, path)
    grow = _need(shapes, "body.0.rdb1.conv1.weight", 4, path) if num_block else (0,)
    num_feat, in_ch = first[0], first[1]
    if in_ch not in _UNSHUFFLE_BY_IN_CH:
        raise _fail(path, f"`conv_first` takes {in_ch} input channels; expected 3, 12 or 48")
    if last[0] != 3:
        raise _fail(path, f"`conv_last` gives {last[0]} output channels; expected 3 (RGB)")
    if num_block == 0 or num_up == 0:
        raise _fail(path, "no RRDB blocks or no upsample convs")
    unshuffle = _UNSHUFFLE_BY_IN_CH[in_ch]
    if (2**num_up) % unshuffle:
        raise _fail(path, f"{num_up} upsample stages with pixel-unshuffle {unshuffle}")
    scale = 2**num_up // unshuffle
    kwargs = dict(num_feat=num_feat, num_block=num_block, num_grow=grow[0], num_up=num_up, unshuffle=unshuffle)
    return ArchSpec(
        arch="RRDBNet", layout=layout, scale=scale, num_feat=num_feat, num_block=num_block,
        num_grow=grow[0], num_up=num_up, unshuffle=unshuffle, kwargs=kwargs,
    )


def _detect_compact(shapes: Mapping[str, tuple[int, ...]], *, path: str) -> ArchSpec:
    idx = sorted({int(m[1]) for k in shapes if (m := re.fullmatch(r"body\.(\d+)\.weight", k))})
    if idx != list(range(len(idx))):
        raise _fail(path, f"`body` indices are not contiguous: {idx[:8]}...")
    last = idx[-1]
    if last % 2 or last < 2:
        raise _fail(path, f"last `body` index {last} is not a conv (expected an even index)")
    for i in idx:
        shape = _need(shapes, f"body.{i}.weight", 4 if i % 2 == 0 else 1, path)
        del shape
    first = shapes["body.0.weight"]
    num_feat, in_ch = first[0], first[1]
    out = shapes[f"body.{last}.weight"][0]
    scale = math.isqrt(out // 3) if out % 3 == 0 else 0
    if in_ch != 3 or scale < 1 or 3 * scale * scale != out:
        raise _fail(path, f"compact net with {in_ch} input and {out} output channels (expected 3 and 3*scale^2)")
    num_conv = last // 2 - 1
    kwargs = dict(num_feat=num_feat, num_conv=num_conv, scale=scale)
    return ArchSpec(
        arch="SRVGGNetCompact", layout="compact", scale=scale, num_feat=num_feat, num_conv=num_conv, kwargs=kwargs
    )
