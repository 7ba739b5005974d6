"""`imagegen upscale RUN` / `imagegen upscale IMAGE... --model PATH (--scale S | --width W | --height H)`.

Parsing and printing only: the flow (settings, plans, naming, resume) is `imagegen.upscale.run`.
torch is only imported when a model is loaded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import typer

from imagegen.cli.app import app, err, examples
from imagegen.defaults import DEFAULT_FORMAT


def _progress_printer(label: str) -> Callable[[int, int], None]:
    """Progress on stderr: a rewritten line on a terminal, else a line every 25%."""
    tty = sys.stderr.isatty()
    state = {"last": -1, "t0": time.perf_counter()}

    def show(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if tty:
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\r  {label}: {done}/{total} tiles ({pct}%){end}")
            sys.stderr.flush()
        elif pct // 25 > state["last"]:
            state["last"] = pct // 25
            err(f"  {label}: {done}/{total} tiles ({pct}%, {time.perf_counter() - state['t0']:.1f} s)")

    return show


@app.command("upscale", epilog=examples(
    "imagegen upscale runs/example                      (the picks, with the recipe's upscale: settings)",
    "imagegen upscale runs/example --width 6000 -f png",
    "imagegen upscale a.png b.png --model RealESRGAN_x4plus.pth --scale 4 --out big/"))
def upscale(
    images: list[Path] = typer.Argument(..., metavar="RUN|IMAGE", help="A run folder (its picks) or image files.",
                                        show_default=False),
    model: Path = typer.Option(None, "--model", "-m", help="Real-ESRGAN/ESRGAN weights (.pth or .safetensors), or builtin:demo-x4."),
    scale: float = typer.Option(None, "--scale", help="Output size as a multiple of the input."),
    width: int = typer.Option(None, "--width", help="Output width in pixels (height keeps the aspect)."),
    height: int = typer.Option(None, "--height", help="Output height in pixels (width keeps the aspect)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/upscaled, or next to each image)."),
    tile: int = typer.Option(None, "--tile", help="Tile side in input pixels; 0 = whole image (default: from memory)."),
    fmt: str = typer.Option(None, "--format", "-f", help="tif (tiled BigTIFF, default), png or jpg."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available)."),
    dtype: str = typer.Option(None, "--dtype", help="fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 on CPU)."),
) -> None:
    """Upscale a run's picks (settings from the recipe's `upscale:` section, overridable here)
    or any image files, tile by tile, to a scale or an exact width/height."""
    from imagegen.upscale.run import is_run_folder, upscale_files, upscale_run

    if model is not None and str(model).startswith("builtin:"):  # a shipped file, e.g. builtin:demo-x4
        from imagegen.errors import InputError
        from imagegen.models import BUILTIN_FILES

        name = str(model)[len("builtin:"):]
        if name not in BUILTIN_FILES:
            raise InputError(f"`--model` {model}: unknown built-in file; built-ins: {', '.join('builtin:' + n for n in BUILTIN_FILES)}")
        model = BUILTIN_FILES[name]
    common = dict(scale=scale, width=width, height=height, out=out, tile=tile, device=device, dtype=dtype,
                  on_message=typer.echo, progress=_progress_printer)
    if len(images) == 1 and is_run_folder(images[0]):
        upscale_run(images[0], model=model, fmt=fmt, **common)
    else:
        upscale_files(images, model=model, fmt=fmt or DEFAULT_FORMAT, **common)
