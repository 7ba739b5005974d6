"""`imagegen upscale IMAGE... --model PATH (--scale S | --width W | --height H)`.

File mode lives in `upscale_files`, which a run-folder mode (`imagegen upscale RUN`, picks plus
the recipe's `upscale:` section) can call with its own list of images and output folder.
torch is only imported when a model is loaded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import typer

from imagegen.cli.app import app, err, examples
from imagegen.errors import InputError

DEFAULT_FORMAT = "tif"  # tiled Deflate BigTIFF: streams by tile, no size limit, opens everywhere


@dataclass(frozen=True)
class FileJob:
    """One image to upscale: source, destination and its plan."""

    src: Path
    dst: Path
    plan: object  # imagegen.upscale.UpscalePlan


def output_name(src: Path, final_size: tuple[int, int], fmt: str) -> str:
    """`<stem>-<W>w.<fmt>`, e.g. `0042-ab12cd-17000w.tif`."""
    return f"{src.stem}-{final_size[0]}w.{fmt}"


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    from imagegen.upscale import allow_huge_images

    if not path.is_file():
        raise InputError(f"`IMAGE` not found: {path}")
    try:
        with allow_huge_images(), Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"`IMAGE` {path} is not a readable image: {exc}") from None


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


def upscale_files(
    images: Sequence[Path],
    *,
    model: Path,
    scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    out: Path | None = None,
    tile: int | None = None,
    fmt: str = DEFAULT_FORMAT,
    device: str | None = None,
    dtype: str | None = None,
    echo: Callable[[str], None] = typer.echo,
    progress: bool = True,
) -> tuple[list[Path], list[Path]]:
    """Upscale image files into `out` (default: next to each source); returns (written, skipped).

    Prints the plan for every image first, skips outputs that already exist (so a rerun resumes)
    and writes each output atomically. Raises `InputError` / `ModelError` for bad arguments,
    images or weights.
    """
    from imagegen.upscale import FORMATS, load_upscaler, plan_passes, upscale_image
    from imagegen.upscale.writers import FORMAT_ALIASES

    # 1. Check inputs.
    given = [n for n, v in (("--scale", scale), ("--width", width), ("--height", height)) if v is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one of --scale, --width, --height; got {', '.join(given) or 'none'}")
    fmt_key = FORMAT_ALIASES.get(fmt.lower())
    if fmt_key is None:
        raise InputError(f"`--format` must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if tile is not None and (tile < 0 or 0 < tile < 16):
        raise InputError(f"`--tile` must be 0 (whole image, no tiling) or at least 16 pixels; got {tile}")
    if not images:
        raise InputError("give at least one `IMAGE`")
    sizes = {src: _image_size(src) for src in images}

    # 2. Load the model (its scale drives the plans) and plan every image.
    up = load_upscaler(model, device=device, dtype=dtype)
    echo(f"model: {up.name} ({up.spec.describe()}, hash {up.short_hash}) on {up.device} {up.dtype}")
    jobs: list[FileJob] = []
    for src, (w, h) in sizes.items():
        plan = plan_passes(w, h, up.scale, scale=scale, target_width=width, target_height=height)
        folder = out if out is not None else src.parent
        jobs.append(FileJob(src, folder / output_name(src, plan.final_size, fmt_key), plan))
    for job in jobs:
        fw, fh = job.plan.final_size
        state = "exists, skip" if job.dst.exists() else "to do"
        echo(f"{job.src} {job.plan.source_size[0]}x{job.plan.source_size[1]} -> {job.dst} {fw}x{fh} ({state})")
        for line in job.plan.describe().splitlines():
            echo(f"    {line}")

    # 3. Run what is missing (after clearing half-written files a killed run left).
    from imagegen.fsutil import remove_temp_files

    written: list[Path] = []
    skipped: list[Path] = []
    for i, job in enumerate(jobs, 1):
        remove_temp_files(job.dst.parent, job.dst.name)
        if job.dst.exists():
            skipped.append(job.dst)
            continue
        t0 = time.perf_counter()
        show = _progress_printer(f"[{i}/{len(jobs)}] {job.src.name}") if progress else None
        upscale_image(job.src, job.dst, up, job.plan, tile=tile, fmt=fmt_key, progress=show)
        written.append(job.dst)
        echo(f"wrote {job.dst} ({time.perf_counter() - t0:.1f} s)")
    echo(f"done: {len(written)} written, {len(skipped)} already there")
    return written, skipped


def run_upscale_targets(run: Path) -> tuple[list[Path], dict]:
    """The picked, rendered images of a run folder and the recipe's `upscale:` settings.

    Raises InputError when the run has no picks, or a pick is not rendered yet."""
    import json

    from imagegen.runsheets import list_picks
    from imagegen.store import RunStore

    store = RunStore.open(run, create=False, lock=False)
    try:
        picks = list_picks(store)
        settings = json.loads(store.get_meta("upscale") or "{}")
    finally:
        store.close()
    if not picks:
        raise InputError(f"{run}: no picks in {run / 'picks.txt'}; pick first: imagegen pick {run} 12 57 203-210")
    missing = [str(i) for i, _, path in picks if path is None or not path.exists()]
    if missing:
        raise InputError(f"{run}: picks {', '.join(missing)} have no rendered image yet; render first or remove them "
                         f"(imagegen pick {run} --remove {' '.join(missing)})")
    return [path for _, _, path in picks], settings


@app.command("upscale", epilog=examples(
    "imagegen upscale runs/example                      (the picks, with the recipe's upscale: settings)",
    "imagegen upscale runs/example --width 6000 -f png",
    "imagegen upscale a.png b.png --model RealESRGAN_x4plus.pth --scale 4 --out big/"))
def upscale(
    images: list[Path] = typer.Argument(..., metavar="RUN|IMAGE", help="A run folder (its picks) or image files.",
                                        show_default=False),
    model: Path = typer.Option(None, "--model", "-m", help="Real-ESRGAN/ESRGAN weights (.pth or .safetensors)."),
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
    from imagegen.store import MANIFEST

    if len(images) == 1 and images[0].is_dir() and (images[0] / MANIFEST).exists():
        run = images[0]
        files, settings = run_upscale_targets(run)
        if scale is None and width is None and height is None:
            scale, width, height = settings.get("scale"), settings.get("width"), settings.get("height")
        model = model or (Path(settings["model"]) if settings.get("model") else None)
        if model is None:
            raise InputError(f"{run}: no upscale model: set `upscale.model` in the recipe or pass --model")
        if scale is None and width is None and height is None:
            raise InputError(f"{run}: no target size: set `upscale.width` (or height, scale) in the recipe or pass --width")
        images, out = files, out or run / "upscaled"
        fmt = fmt or settings.get("format") or DEFAULT_FORMAT
        tile = tile if tile is not None else settings.get("tile")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"`--out` {out}: cannot create the folder: {exc.strerror or exc}") from None
    dirs = [p for p in images if p.is_dir()]
    if dirs:
        raise InputError(f"`IMAGE` {dirs[0]} is a folder but not a run folder; give a run folder or image files")
    if model is None:
        raise InputError("`--model` is required: a Real-ESRGAN .pth or .safetensors file")
    upscale_files(
        images, model=model, scale=scale, width=width, height=height, out=out, tile=tile,
        fmt=fmt or DEFAULT_FORMAT, device=device, dtype=dtype,
    )
