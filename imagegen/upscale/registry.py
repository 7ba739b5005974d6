"""The upscaler architectures, in detection order (the first whose marker keys match decides).
Adding one: a folder under `archs/` plus one line here."""

from __future__ import annotations

from imagegen.upscale.archs import compact, rrdbnet
from imagegen.upscale.archspec import Architecture

ARCHITECTURES: tuple[Architecture, ...] = (
    rrdbnet.ARCH,
    compact.ARCH,
)


def architecture(name: str) -> Architecture:
    """The record named `name`. Raises KeyError for an unknown name."""
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise KeyError(name)
