"""Command-line interface: `imagegen COMMAND ...`.

Each area registers its commands from its own module; importing them here wires them up.
None of them imports torch at module level.
"""

from __future__ import annotations

import sys

from imagegen.cli.app import app, run_app
from imagegen.cli import recipes as _recipes  # noqa: F401  validate, plan
from imagegen.cli import render as _render  # noqa: F401  render, status, reproduce
from imagegen.cli import serve as _serve  # noqa: F401  serve, submit, queue, cancel
from imagegen.cli import sheets as _sheets  # noqa: F401  sheet, pick, picks
from imagegen.cli import upscale as _upscale  # noqa: F401  upscale

__all__ = ["app", "main", "run_app"]


def main() -> None:
    """Console-script entry point."""
    sys.exit(run_app(sys.argv[1:]))
