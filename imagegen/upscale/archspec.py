"""What an upscaler architecture is to the rest of the upscaler: an `Architecture` record (how
to recognise its weight files, build the network, name it, and size its tiles) and the
`ArchSpec` that detection returns. Torch-free. The records live one per folder under
`archs/`; `registry.py` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Shapes = Mapping[str, tuple[int, ...]]


class LayoutMismatch(Exception):
    """Raised by an architecture's `detect` when the keys are its own but the shapes do not fit;
    `detect.detect` turns it into a ModelError that lists every understood layout."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class ArchSpec:
    """What detection found: the architecture, the key layout, the scale, and the network's
    constructor arguments (`params`, also readable as attributes: `spec.num_block`)."""

    arch: str  # Architecture.name, e.g. "RRDBNet"
    layout: str  # which key layout the file uses, e.g. "basicsr" or "esrgan"
    scale: int  # output pixels per input pixel along each side
    params: dict[str, int] = field(default_factory=dict, compare=False)
    pad_multiple: int = 1  # input sides must be a multiple of this (pixel-unshuffle factor)

    def __getattr__(self, name: str) -> int:
        params = self.__dict__.get("params") or {}
        if name in params:
            return params[name]
        raise AttributeError(name)

    @property
    def kwargs(self) -> dict[str, int]:
        """Constructor arguments of the network."""
        return dict(self.params)


@dataclass(frozen=True)
class Architecture:
    """One upscaler architecture. Adding one: a folder under `archs/` with its record (and its
    torch network in `net.py`), plus one line in `registry.py`."""

    name: str  # the network class name
    layouts: tuple[tuple[str, str], ...]  # (layout key, how the error message describes its keys)
    models: tuple[str, ...]  # official models this reproduces (for docs and messages)
    match: Callable[[set[str]], str | None]  # the layout key whose marker keys are present, else None
    detect: Callable[[Shapes, str], ArchSpec]  # read the settings from the shapes; raises LayoutMismatch
    build: Callable[[ArchSpec], Any]  # a fresh torch module (imports torch)
    describe: Callable[[ArchSpec], str]
    activation_bytes: Callable[[ArchSpec, int], int]  # peak bytes per input pixel of a tile, per item size
    convert: Callable[[dict[str, Any], ArchSpec], dict[str, Any]] = lambda state, spec: state  # to our key names
