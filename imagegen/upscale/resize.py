"""Lanczos resizing of an image that arrives (and leaves) as row strips.

The resize is done as two explicit Pillow passes: horizontal (each incoming row on its own),
then vertical over a slab of rows with a fractional `box`. Pillow takes a filter's support from
the whole image it is given, so as long as the slab holds the support of the requested rows the
result equals a one-shot two-pass resize, whatever the strip boundaries. (Pillow's own one-shot
`resize` may pick the pass order by cost, and rounding after the first pass then differs.)

`resize_strips` can run both passes in worker threads (Pillow releases the GIL while it
resamples): each incoming strip's horizontal pass and each block of `OUT_ROWS` output rows is
one call, computed from data no other call changes, so the strips are the same with any
number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

LANCZOS_SUPPORT = 3.0  # Pillow's Lanczos (a=3) support, in source pixels at scale 1
OUT_ROWS = 64  # output rows produced per Pillow call


def resize_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos-resize an HxWxC (or HxW) uint8 array held in memory to `size` = (w, h)."""
    if (image.shape[1], image.shape[0]) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def hpass(rows: np.ndarray, width: int) -> np.ndarray:
    """Horizontal Lanczos pass only: every row resized to `width` pixels."""
    if rows.shape[1] == width:
        return rows
    return np.asarray(Image.fromarray(rows).resize((width, rows.shape[0]), Image.Resampling.LANCZOS))


def vpass(slab: np.ndarray, src_h: int, h_out: int, j0: int, j1: int, slab_y0: int = 0) -> np.ndarray:
    """Vertical Lanczos pass only: rows [j0, j1) of `src_h` rows resized to `h_out`, from a slab.

    `slab` holds source rows [slab_y0, slab_y0 + len(slab)) and must cover `needed_rows`.
    """
    if src_h == h_out:
        return slab[j0 - slab_y0 : j1 - slab_y0]
    sc = src_h / h_out
    box = (0.0, j0 * sc - slab_y0, float(slab.shape[1]), j1 * sc - slab_y0)
    return np.asarray(Image.fromarray(slab).resize((slab.shape[1], j1 - j0), Image.Resampling.LANCZOS, box=box))


def resize_rows(src: np.ndarray, src_h: int, size: tuple[int, int], j0: int, j1: int, slab_y0: int = 0) -> np.ndarray:
    """Rows [j0, j1) of a two-pass Lanczos resize to `size` of an image `src_h` rows high."""
    return vpass(hpass(src, size[0]), src_h, size[1], j0, j1, slab_y0)


def needed_rows(src_h: int, h_out: int, j0: int, j1: int) -> tuple[int, int]:
    """Source rows [a, b) that output rows [j0, j1) of a resize to `h_out` rows read."""
    sc = src_h / h_out
    support = LANCZOS_SUPPORT * max(sc, 1.0)
    a = max(0, math.floor(j0 * sc - support) - 1)
    b = min(src_h, math.ceil(j1 * sc + support) + 1)
    return a, b


def resize_strips(
    strips: Iterable[np.ndarray], src_size: tuple[int, int], size: tuple[int, int], *, workers: int = 0
) -> Iterator[np.ndarray]:
    """Lanczos-resize a stream of full-width uint8 strips (total `src_size`) to `size`, as strips.

    `workers` > 0 runs the horizontal and vertical passes in that many threads each (the
    strips are the same; 0: in the calling thread).
    """
    from imagegen.upscale.stages import pipelined

    src_w, src_h = src_size
    w_out, h_out = size

    def checked(strips: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for strip in strips:
            if strip.shape[1] != src_w:
                raise ValueError(f"strip width {strip.shape[1]} differs from the declared {src_w}")
            yield strip

    wide = pipelined(checked(strips), lambda s: hpass(s, w_out), workers=workers, depth=2 * workers)

    def blocks() -> Iterator[tuple[np.ndarray, int, int, int]]:
        """(slab, first output row, end row, slab's first source row) of each output block."""
        buf: np.ndarray | None = None  # horizontally resized source rows [buf_y0, buf_y0 + len(buf))
        buf_y0 = 0
        have = 0  # source rows received so far
        j = 0  # next output row
        while j < h_out:
            j1 = min(h_out, j + OUT_ROWS)
            a, b = needed_rows(src_h, h_out, j, j1)
            while have < b:
                strip = next(wide, None)
                if strip is None:
                    raise ValueError(f"strip stream ended at row {have}, expected {src_h}")
                buf = strip if buf is None else np.concatenate([buf, strip])  # a new array: slabs handed out stay as they are
                have += strip.shape[0]
            assert buf is not None
            if a > buf_y0:  # drop rows no later output row needs
                buf = buf[a - buf_y0 :]
                buf_y0 = a
            yield buf[: b - buf_y0], j, j1, buf_y0
            j = j1

    try:
        yield from pipelined(blocks(), lambda blk: vpass(blk[0], src_h, h_out, blk[1], blk[2], blk[3]),
                             workers=workers, depth=2 * workers)
    finally:
        wide.close()
