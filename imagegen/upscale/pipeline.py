"""Upscale one image file to another, streaming the biggest pass straight into the writer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imagegen.defaults import DEFAULT_FORMAT, FORMAT_ALIASES, JPEG_MAX_SIDE
from imagegen.errors import InputError
from imagegen.fsutil import not_a_regular_file, write_atomic
from imagegen.upscale.meta import allow_huge_images, source_metadata, upscale_note, with_note
from imagegen.metadata import file_sha256
from imagegen.upscale.model import Upscaler
from imagegen.upscale.plan import UpscalePlan
from imagegen.upscale.resize import hpass, resize_array, resize_strips, vpass
from imagegen.upscale.stages import THREADS, Timed, prefetch
from imagegen.upscale.tiling import Tiler, choose_config
from imagegen.upscale.writers import WRITERS

ALPHA_ROWS = 256  # output rows of alpha resized per Pillow call


def read_image(src: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """RGB uint8 array, alpha uint8 array or None, and Pillow's `info` of an image file.

    Raises `InputError` when the file is missing or not an image Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    special = not_a_regular_file(src)
    if special:
        raise InputError(f"image {src} {special}")
    if not src.is_file():
        raise InputError(f"image not found: {src}")
    try:
        with allow_huge_images(), Image.open(src) as im:
            info = dict(im.info)
            im.load()
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grey: round to 8 bits
                wide = np.asarray(im, dtype=np.int64).clip(0, 65535)
                im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
            rgba = im.convert("RGBA" if has_alpha else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {src}: {exc}") from None
    arr = np.asarray(rgba)
    if has_alpha:
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3]), info
    return arr, None, info


def _add_alpha(strips: Iterable[np.ndarray], alpha: np.ndarray, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Join colour strips with the source alpha Lanczos-resized straight to `size`, strip by strip."""
    h_src = alpha.shape[0]
    wide = hpass(alpha, size[0])  # source rows at the output width (small: source height)
    y = 0
    for strip in strips:
        n = strip.shape[0]
        a = vpass(wide, h_src, size[1], y, y + n)
        yield np.concatenate([strip, a[..., None]], axis=2)
        y += n


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def upscale_image(
    src: Path,
    dst: Path,
    upscaler: Upscaler,
    plan: UpscalePlan,
    *,
    tile: int | None = None,
    fmt: str = DEFAULT_FORMAT,
    progress: Callable[[int, int], None] | None = None,
    timings: dict[str, float] | None = None,
    overlap: bool = True,
) -> Path:
    """Upscale `src` following `plan` and write `dst` atomically (temp name, fsync, rename).

    `tile` is the tile side in input pixels (None: from free memory; 0: whole image, no tiling).
    `fmt` is tif (tiled Deflate BigTIFF), png or jpg. `progress(done, total)` counts tiles over
    all passes (always called in the calling thread). `timings`, if given, receives the
    seconds of each stage: `read`, `model` (tiles and blending), `resize`, `alpha` (RGBA only),
    `encode` (compression and writing), and `total` (the wall time).

    `overlap` (the default) runs the last pass's stages side by side (imagegen/upscale/stages.py):
    the model in a producer thread ahead of the final resize, itself in a thread ahead of the
    encoder, with small bounded queues between them, and the resize and the compression in
    `THREADS` threads each. `overlap=False` runs everything in the calling thread. Both write
    the same bytes. With overlap, a stage's time is the time its own thread spent on it, so
    the stages add up to more than the wall time.

    Metadata: the source's `parameters` text with an upscale note appended (`Upscaler`,
    `Upscaler hash` = first 10 hex of the weights' sha256, `Upscale passes`, `Final size`) and
    the source's `imagegen` JSON plus an `upscale` object. PNG: `parameters` and `imagegen`
    text chunks; TIFF: ImageDescription (ASCII) plus private tags 65000 (`parameters`, UTF-8)
    and 65001 (`imagegen`, UTF-8); JPEG: EXIF UserComment and a COM segment.

    Raises `InputError` for an unreadable source, a plan made for another size or scale, an
    unknown `fmt`, a `dst` suffix that does not match it, or jpg for RGBA / over 65500 px;
    all before any model work.
    """
    src, dst = Path(src), Path(dst)
    t_all = time.perf_counter()
    tm: dict[str, float] = {}
    # 1. Check inputs.
    fmt_key = FORMAT_ALIASES.get(fmt.lower()) if isinstance(fmt, str) else None
    if fmt_key is None:
        raise InputError(f"`format` must be one of tif, png, jpg; got {fmt!r}")
    if FORMAT_ALIASES.get(dst.suffix.lower().lstrip(".")) != fmt_key:
        raise InputError(f"output name {dst.name} does not end in a .{fmt_key} suffix for `format` {fmt}")
    if plan.model_scale != upscaler.scale:
        raise InputError(f"plan made for a x{plan.model_scale} model but `{upscaler.name}` is x{upscaler.scale}")
    t0 = time.perf_counter()
    rgb, alpha, info = read_image(src)
    h, w = rgb.shape[:2]
    if (w, h) != plan.source_size:
        raise InputError(f"plan made for {plan.source_size[0]}x{plan.source_size[1]} but {src} is {w}x{h}")
    if fmt_key == "jpg" and alpha is not None:
        raise InputError(f"`format` jpg cannot hold the alpha channel of {src.name}; use tif or png")
    if fmt_key == "jpg" and max(plan.final_size) > JPEG_MAX_SIDE:
        raise InputError(f"`format` jpg allows at most {JPEG_MAX_SIDE} px per side; the plan makes "
                         f"{plan.final_size[0]}x{plan.final_size[1]}, use tif")
    if fmt_key == "jpg":
        need = plan.final_size[0] * plan.final_size[1] * 3 * 1.2  # Pillow encodes JPEG from one whole image
        avail = available_memory()
        if avail is not None and need > avail:
            raise InputError(f"`format` jpg needs the whole {plan.final_size[0]}x{plan.final_size[1]} image in memory "
                             f"(~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available); use tif or png, which stream")
    tm["read"] = time.perf_counter() - t0

    # 2. Tile layout per model pass, and a progress total over all passes.
    tiler = Tiler(upscaler)
    configs = []
    total = 0
    for step in plan.steps:
        if step.kind == "model":
            cfg = choose_config(upscaler, *step.in_size, tile)
            configs.append(cfg)
            total += tiler.tile_count(*step.in_size, cfg)
    done = 0
    shown = -1
    caller = threading.current_thread()

    def show() -> None:
        nonlocal shown
        if progress is not None and done != shown:
            shown = done
            progress(done, total)

    def tick(n: int) -> None:
        nonlocal done
        done += n  # the model runs in one thread at a time; the caller's thread shows it
        if threading.current_thread() is caller:
            show()

    tiler.progress = tick
    show()

    # 3. All passes but the last one are held in memory as uint8 (they are smaller than the output).
    last_model = max(i for i, s in enumerate(plan.steps) if s.kind == "model")
    image = rgb
    pass_no = 0
    for step in plan.steps[:last_model]:
        t0 = time.perf_counter()
        if step.kind == "model":
            out = np.empty((step.out_size[1], step.out_size[0], 3), np.uint8)
            y = 0
            for strip in tiler.strips(image, configs[pass_no]):
                out[y : y + strip.shape[0]] = strip
                y += strip.shape[0]
            image = out
            pass_no += 1
            tm["model"] = tm.get("model", 0.0) + time.perf_counter() - t0
        else:
            image = resize_array(image, step.out_size)
            tm["resize"] = tm.get("resize", 0.0) + time.perf_counter() - t0

    # 4. The last pass streams: tiles -> strips -> (final Lanczos) -> (alpha) -> writer. Each
    #    stage is timed inclusively in the thread that pulls it; with overlap, a stage pulls
    #    from a queue filled by the stage before it in another thread. Exclusive times below.
    last = plan.steps[last_model]
    tail = plan.steps[last_model + 1 :]
    if len(tail) > 1 or any(s.kind != "resize" for s in tail):
        raise InputError("plan has more than one step after its last model pass")
    workers = THREADS if overlap else 0
    chain: list[tuple[str, Timed[np.ndarray]]] = []  # (stage, its timer), in pull order

    def stage(name: str, it: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        timer = Timed(it)
        chain.append((name, timer))
        if not overlap:
            return timer
        waited = Timed(prefetch(timer, name=name))  # what the next stage waits for this one
        chain.append(("wait", waited))
        return waited

    strips: Iterable[np.ndarray] = stage("model", tiler.strips(image, configs[pass_no]))
    if tail:
        strips = stage("resize", resize_strips(strips, last.out_size, tail[0].out_size, workers=workers))
    if alpha is not None:
        strips = Timed(_add_alpha(strips, alpha, plan.final_size))
        chain.append(("alpha", strips))  # type: ignore[arg-type]
    channels = 3 if alpha is None else 4

    def shown_strips(strips: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for strip in strips:
            show()
            yield strip
        show()

    # 5. Metadata.
    params, data = source_metadata(info)
    note = upscale_note(upscaler.name, upscaler.short_hash, plan)
    data = dict(data or {})
    if "upscale" in data:
        data["previous_upscale"] = data.pop("upscale")
    data["upscale"] = {
        "model": upscaler.name,
        "model_sha256": upscaler.sha256,
        "arch": upscaler.describe(),
        "model_scale": upscaler.scale,
        "passes": plan.passes,
        "steps": [{"kind": s.kind, "in": list(s.in_size), "out": list(s.out_size)} for s in plan.steps],
        "final_size": list(plan.final_size),
        "tile": configs[-1].tile,
        "overlap": configs[-1].overlap,
        "device": upscaler.device,
        "dtype": upscaler.dtype,
        "format": fmt_key,
        "source": {"file": src.name, "sha256": file_sha256(src), "size": [w, h], "alpha": alpha is not None},
    }

    # 6. Write atomically.
    writer = WRITERS[fmt_key]
    fw, fh = plan.final_size
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        write_atomic(dst, lambda f: writer(f, shown_strips(strips), fw, fh, channels, with_note(params, note), data,
                                           workers=workers))
    finally:
        for _, timer in reversed(chain):  # stop producer threads left running by an error
            timer.close()
    t_write = time.perf_counter() - t0
    # 7. Exclusive times per stage: inclusive minus what it pulled from, in the same thread.
    below = 0.0
    for name, timer in chain:
        if name != "wait":
            tm[name] = tm.get(name, 0.0) + timer.seconds - below
        below = timer.seconds
    tm["encode"] = t_write - below
    tm["total"] = time.perf_counter() - t_all
    if timings is not None:
        timings.update(tm)
    return dst
