"""The upscale flow for files and for a run's picks: which settings win, planning, naming,
skip and resume, temp cleanup. The CLI and the Python API both call this; it never prints:
messages go to `on_message`, tile progress to the callback `progress(label)` returns.

Which settings win, for a run: a value given here (command line or API) > the recipe's
`upscale:` section > the default (`defaults.DEFAULT_FORMAT`; the tile size from free memory).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen.defaults import DEFAULT_FORMAT, FORMAT_ALIASES, FORMATS
from imagegen.errors import InputError
from imagegen.fsutil import not_a_regular_file, remove_temp_files
from imagegen.upscale.plan import UpscalePlan, plan_passes

Progress = Callable[[int, int], None]  # (tiles done, tiles in all)
UPSCALED = "upscaled"  # a run's output folder


@dataclass(frozen=True)
class FileJob:
    """One image to upscale: source, destination and its plan."""

    src: Path
    dst: Path
    plan: UpscalePlan


@dataclass
class UpscaleResult:
    """What one upscale call did: outputs written, and outputs that were already there."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def output_name(src: Path, final_size: tuple[int, int], fmt: str) -> str:
    """`<stem>-<W>w.<fmt>`, e.g. `0042-ab12cd-17000w.tif`."""
    return f"{src.stem}-{final_size[0]}w.{fmt}"


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header. Raises InputError when it is
    missing or not a readable image."""
    from PIL import Image, UnidentifiedImageError

    from imagegen.upscale.meta import allow_huge_images

    special = not_a_regular_file(path)
    if special:
        raise InputError(f"`IMAGE` {path} {special}")
    if not path.is_file():
        raise InputError(f"`IMAGE` not found: {path}")
    try:
        with allow_huge_images(), Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"`IMAGE` {path} is not a readable image: {exc}") from None


def check_format(fmt: str) -> str:
    """The canonical format for `fmt` (tif, tiff, png, jpg, jpeg). Raises InputError otherwise."""
    key = FORMAT_ALIASES.get(fmt.lower()) if isinstance(fmt, str) else None
    if key is None:
        raise InputError(f"`--format` must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return key


def upscale_files(
    images: Sequence[Path],
    *,
    model: Path | None,
    scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    out: Path | None = None,
    tile: int | None = None,
    fmt: str = DEFAULT_FORMAT,
    device: str | None = None,
    dtype: str | None = None,
    on_message: Callable[[str], None] = lambda line: None,
    progress: Callable[[str], Progress | None] | None = None,
) -> UpscaleResult:
    """Upscale image files into `out` (default: next to each source).

    Reports the plan for every image first (through `on_message`), skips outputs that already
    exist (so a rerun resumes), removes half-written files a killed run left, and writes each
    output atomically. Raises InputError / ModelError for bad arguments, images or weights."""
    from imagegen.upscale.model import load_upscaler
    from imagegen.upscale.pipeline import upscale_image

    # 1. Check inputs.
    if out is not None:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"`--out` {out}: cannot create the folder: {exc.strerror or exc}") from None
    dirs = [p for p in images if Path(p).is_dir()]
    if dirs:
        raise InputError(f"`IMAGE` {dirs[0]} is a folder but not a run folder; give a run folder or image files")
    if model is None:
        raise InputError("`--model` is required: a Real-ESRGAN .pth or .safetensors file")
    given = [n for n, v in (("--scale", scale), ("--width", width), ("--height", height)) if v is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one of --scale, --width, --height; got {', '.join(given) or 'none'}")
    fmt_key = check_format(fmt)
    if tile is not None and (tile < 0 or 0 < tile < 16):
        raise InputError(f"`--tile` must be 0 (whole image, no tiling) or at least 16 pixels; got {tile}")
    if not images:
        raise InputError("give at least one `IMAGE`")
    sizes = {Path(src): image_size(Path(src)) for src in images}

    # 2. Load the model (its scale drives the plans) and plan every image.
    up = load_upscaler(model, device=device, dtype=dtype)
    on_message(f"model: {up.name} ({up.describe()}, hash {up.short_hash}) on {up.device} {up.dtype}")
    jobs: list[FileJob] = []
    for src, (w, h) in sizes.items():
        plan = plan_passes(w, h, up.scale, scale=scale, target_width=width, target_height=height)
        folder = Path(out) if out is not None else src.parent
        jobs.append(FileJob(src, folder / output_name(src, plan.final_size, fmt_key), plan))
    for job in jobs:
        fw, fh = job.plan.final_size
        state = "exists, skip" if job.dst.exists() else "to do"
        on_message(f"{job.src} {job.plan.source_size[0]}x{job.plan.source_size[1]} -> {job.dst} {fw}x{fh} ({state})")
        for line in job.plan.describe().splitlines():
            on_message(f"    {line}")

    # 3. Run what is missing, after clearing every half-written file a killed run left in the
    #    output folders (imagegen's own temp names only, of no live process).
    result = UpscaleResult()
    for folder in sorted({job.dst.parent for job in jobs}):
        remove_temp_files(folder)
    for i, job in enumerate(jobs, 1):
        if job.dst.exists():
            result.skipped.append(job.dst)
            continue
        t0 = time.perf_counter()
        show = progress(f"[{i}/{len(jobs)}] {job.src.name}") if progress else None
        upscale_image(job.src, job.dst, up, job.plan, tile=tile, fmt=fmt_key, progress=show)
        result.written.append(job.dst)
        on_message(f"wrote {job.dst} ({time.perf_counter() - t0:.1f} s)")
    on_message(f"done: {len(result.written)} written, {len(result.skipped)} already there")
    return result


def run_targets(run: Path) -> tuple[list[Path], dict[str, Any]]:
    """The picked, rendered images of a run folder and the recipe's `upscale:` settings.

    Raises InputError when the folder is not a run, the run has no picks, or a pick is not
    rendered yet."""
    from imagegen.picks import list_picks
    from imagegen.store import RunStore

    with RunStore.open(run, create=False, lock=False) as store:
        picks = list_picks(store)
        settings = json.loads(store.get_meta("upscale") or "{}")
    if not picks:
        raise InputError(f"{run}: no picks in {run / 'picks.txt'}; pick first: imagegen pick {run} 12 57 203-210")
    missing = [str(i) for i, _, path in picks if path is None or not path.exists()]
    if missing:
        raise InputError(f"{run}: picks {', '.join(missing)} have no rendered image yet; render first or remove them "
                         f"(imagegen pick {run} --remove {' '.join(missing)})")
    return [path for _, _, path in picks], settings


def is_run_folder(path: Path) -> bool:
    """Whether `path` is a run folder (it holds a manifest)."""
    from imagegen.store import MANIFEST

    return Path(path).is_dir() and (Path(path) / MANIFEST).exists()


def upscale_run(
    run: Path,
    *,
    model: Path | None = None,
    scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    out: Path | None = None,
    tile: int | None = None,
    fmt: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    on_message: Callable[[str], None] = lambda line: None,
    progress: Callable[[str], Progress | None] | None = None,
) -> UpscaleResult:
    """Upscale a run's picks into `RUN/upscaled/` (or `out`).

    Settings given here win over the recipe's `upscale:` section (a target size given here
    replaces the recipe's whole target: scale, width and height go together). Raises
    InputError when there are no picks, a pick is not rendered, or no model or target size is
    known; ModelError for unusable weights."""
    run = Path(run)
    files, settings = run_targets(run)
    if scale is None and width is None and height is None:
        scale, width, height = settings.get("scale"), settings.get("width"), settings.get("height")
    model = model or (Path(settings["model"]) if settings.get("model") else None)
    missing = []  # every missing setting at once, with how to give it
    if model is None:
        missing.append("no upscale model (`upscale.model` in the recipe, or --model)")
    if scale is None and width is None and height is None:
        missing.append("no target size (`upscale.width`, `height` or `scale` in the recipe, or --width/--height/--scale)")
    if missing:
        raise InputError(
            f"{run}: cannot upscale: {'; '.join(missing)}. Add to the recipe, for example:\n"
            "  upscale:\n    model: models/RealESRGAN_x4plus.pth\n    width: 6000        # or height: N, or scale: S\n"
            "    format: tif\n"
            f"and render it once to record the settings, or pass them here: imagegen upscale {run} --model M.pth --width 6000"
        )
    return upscale_files(
        files, model=model, scale=scale, width=width, height=height, out=out or run / UPSCALED,
        tile=tile if tile is not None else settings.get("tile"), fmt=fmt or settings.get("format") or DEFAULT_FORMAT,
        device=device, dtype=dtype, on_message=on_message, progress=progress,
    )
