"""Plan how to reach a target size with a fixed-scale model: model passes plus Lanczos resizes.

The rule: run as many model passes as needed to reach the target (at least one); if the last
pass would overshoot the target by more than `OVERSHOOT_LIMIT` along the width, first shrink the
intermediate image (never the source) so the last pass lands on about the target size, which
bounds the work of the biggest pass. A final Lanczos resize gives the exact size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imagegen.defaults import MAX_UPSCALE_SIDE
from imagegen.errors import InputError

# Largest linear overshoot of the last pass accepted before the intermediate is shrunk first
# (1.25 = at most ~1.56x the target's pixels computed by the biggest pass).
OVERSHOOT_LIMIT = 1.25


@dataclass(frozen=True)
class PlanStep:
    """One step: `kind` is "model" (a pass of the network) or "resize" (Lanczos)."""

    kind: str
    in_size: tuple[int, int]
    out_size: tuple[int, int]

    def describe(self, model_scale: int) -> str:
        (w0, h0), (w1, h1) = self.in_size, self.out_size
        if self.kind == "model":
            return f"model x{model_scale}: {w0}x{h0} -> {w1}x{h1}"
        return f"lanczos: {w0}x{h0} -> {w1}x{h1}"


@dataclass(frozen=True)
class UpscalePlan:
    """The steps from `source_size` to `final_size`; `passes` counts the model passes."""

    source_size: tuple[int, int]
    final_size: tuple[int, int]
    model_scale: int
    steps: tuple[PlanStep, ...]

    @property
    def passes(self) -> int:
        return sum(1 for s in self.steps if s.kind == "model")

    def describe(self) -> str:
        """One line per step."""
        return "\n".join(s.describe(self.model_scale) for s in self.steps)

    def note(self) -> str:
        """Compact one-line summary for metadata, e.g. `x4 1536x1024>6144x4096, lanczos 4250x2834, ...`."""
        parts = []
        for s in self.steps:
            w, h = s.out_size
            parts.append(f"x{self.model_scale} {w}x{h}" if s.kind == "model" else f"lanczos {w}x{h}")
        return "; ".join(parts)


def _target(width: int, height: int, scale: float | None, tw: int | None, th: int | None) -> tuple[int, int]:
    given = [n for n, v in (("scale", scale), ("target_width", tw), ("target_height", th)) if v is not None]
    if len(given) != 1:
        raise InputError(
            f"give exactly one of `scale`, `target_width`, `target_height`; got {', '.join(given) or 'none'}"
        )
    if scale is not None:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 1):
            raise InputError(f"`scale` must be a number >= 1; got {scale!r}")
        return max(1, round(width * scale)), max(1, round(height * scale))
    if tw is not None:
        if not isinstance(tw, int) or tw < width:
            raise InputError(f"`target_width` must be an integer >= the source width {width}; got {tw!r}")
        return tw, max(1, round(height * tw / width))
    assert th is not None
    if not isinstance(th, int) or th < height:
        raise InputError(f"`target_height` must be an integer >= the source height {height}; got {th!r}")
    return max(1, round(width * th / height)), th


def plan_passes(
    width: int,
    height: int,
    model_scale: int,
    *,
    scale: float | None = None,
    target_width: int | None = None,
    target_height: int | None = None,
) -> UpscalePlan:
    """Plan model passes and resizes from `width`x`height` to the requested size.

    Exactly one of `scale` (>= 1), `target_width`, `target_height` is given; the other side keeps
    the aspect ratio. Raises `InputError` for a bad request or an output side over `MAX_UPSCALE_SIDE`.
    """
    if width < 1 or height < 1:
        raise InputError(f"source size must be positive; got {width}x{height}")
    if model_scale < 1:
        raise InputError(f"`model_scale` must be >= 1; got {model_scale}")
    tw, th = _target(width, height, scale, target_width, target_height)
    if max(tw, th) > MAX_UPSCALE_SIDE:
        raise InputError(f"target size {tw}x{th} is too large: imagegen makes at most {MAX_UPSCALE_SIDE} px per side in "
                         "every format (the passes before the last are held in memory as 8-bit images, and few "
                         "editors open larger files), though BigTIFF itself could hold more")
    factor = max(tw / width, th / height)
    if model_scale == 1:
        n = 1
    else:
        n = max(1, math.ceil(math.log(factor) / math.log(model_scale) - 1e-9))
    steps: list[PlanStep] = []
    size = (width, height)
    for i in range(n):
        if i == n - 1 and i > 0 and model_scale > 1:
            # Input that makes the last pass land on (just above) the target.
            need = (math.ceil(tw / model_scale), math.ceil(th / model_scale))
            if size[0] > need[0] * OVERSHOOT_LIMIT:
                steps.append(PlanStep("resize", size, need))
                size = need
        out = (size[0] * model_scale, size[1] * model_scale)
        steps.append(PlanStep("model", size, out))
        size = out
    if size != (tw, th):
        steps.append(PlanStep("resize", size, (tw, th)))
    return UpscalePlan(source_size=(width, height), final_size=(tw, th), model_scale=model_scale, steps=tuple(steps))
