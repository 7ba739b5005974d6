"""Recognise an upscaler weight file from its key names and tensor shapes.

Works on a mapping `name -> shape` so it needs no torch. Each architecture in
`registry.ARCHITECTURES` is asked in order whether the keys are its own (`match`), and the
first that claims them reads its settings from the shapes (`detect`): scale, block count,
width, pixel-unshuffle factor.
"""

from __future__ import annotations

from collections.abc import Mapping

from imagegen.errors import ModelError
from imagegen.upscale.archspec import ArchSpec, LayoutMismatch
from imagegen.upscale.registry import ARCHITECTURES

# The layouts we understand, quoted in the error for anything else.
LAYOUTS: tuple[str, ...] = tuple(text for arch in ARCHITECTURES for _, text in arch.layouts)


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


def detect(shapes: Mapping[str, tuple[int, ...]], *, path: str = "weights") -> ArchSpec:
    """Find the architecture of an (unwrapped) state dict given as `name -> shape`.

    Raises `ModelError` naming the understood layouts when nothing matches.
    """
    keys = set(shapes)
    for arch in ARCHITECTURES:
        layout = arch.match(keys)
        if layout is not None:
            try:
                return arch.detect(shapes, layout)
            except LayoutMismatch as exc:
                raise _fail(path, exc.why) from None
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    raise _fail(path, f"unrecognised keys: {sample}")
