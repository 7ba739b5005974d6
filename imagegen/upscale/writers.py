"""Write an image that arrives as uint8 row strips, without holding it whole (except JPEG).

- TIFF: tiled (256x256) BigTIFF, Deflate (zlib) with horizontal predictor; tiles are compressed
  by us in a thread pool while the model makes the next strips, and tifffile writes the bytes. Metadata: ImageDescription (tag 270) holds the `parameters` text (ASCII;
  other characters as backslash escapes), private tag 65000 the exact `parameters` text as
  UTF-8, private tag 65001 the `imagegen` JSON as UTF-8.
- PNG: written by hand: IHDR, tEXt/iTXt (`parameters`, `imagegen`), IDAT streamed through
  `zlib.compressobj` with the Paeth filter on every row, IEND.
- JPEG: Pillow needs the whole image, so strips are pasted into one uint8 Pillow image (never
  float); `parameters` goes to EXIF UserComment, the `imagegen` JSON to a COM segment.

All writers take an open binary file; atomic naming is the caller's job.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, TypeVar

import numpy as np

from imagegen.defaults import JPEG_MAX_SIDE
from imagegen.errors import InputError
from imagegen.metadata import png_chunk, png_text_chunk, strict_json

T = TypeVar("T")
R = TypeVar("R")

# Defaults, one place.
TIFF_TILE = 256  # TIFF tile side in pixels
TIFF_LEVEL = 6  # Deflate level for TIFF tiles
ENCODE_THREADS = max(1, min(8, os.cpu_count() or 1))  # threads compressing TIFF tiles
PNG_LEVEL = 6  # zlib level for PNG IDAT
PNG_IDAT_BYTES = 1 << 20  # flush compressed data in IDAT chunks of about this size
JPEG_QUALITY = 95
TAG_PARAMETERS = 65000  # private TIFF tag: `parameters` text, UTF-8
TAG_IMAGEGEN = 65001  # private TIFF tag: `imagegen` JSON, UTF-8


def _tiles(strips: Iterable[np.ndarray], width: int, height: int, channels: int) -> Iterator[np.ndarray]:
    """Regroup full-width strips into TIFF_TILE x TIFF_TILE tiles, row-major, zero-padded."""
    t = TIFF_TILE
    buf = np.zeros((t, width, channels), np.uint8)
    filled = 0
    rows_seen = 0

    def flush(n: int) -> Iterator[np.ndarray]:
        if n < t:
            buf[n:] = 0
        for x in range(0, width, t):
            tile = buf[:, x : x + t]
            if tile.shape[1] < t:
                padded = np.zeros((t, t, channels), np.uint8)
                padded[:, : tile.shape[1]] = tile
                tile = padded
            yield np.ascontiguousarray(tile)

    for strip in strips:
        rows_seen += strip.shape[0]
        pos = 0
        while pos < strip.shape[0]:
            n = min(t - filled, strip.shape[0] - pos)
            buf[filled : filled + n] = strip[pos : pos + n]
            filled += n
            pos += n
            if filled == t:
                yield from flush(t)
                filled = 0
    if filled:
        yield from flush(filled)
    if rows_seen != height:
        raise ValueError(f"strips gave {rows_seen} rows, expected {height}")


def _encode_tile(tile: np.ndarray, level: int) -> bytes:
    """TIFF predictor 2 (horizontal differencing per sample, mod 256) then Deflate."""
    diff = tile.copy()
    np.subtract(tile[:, 1:], tile[:, :-1], out=diff[:, 1:])
    return zlib.compress(diff, level)


def pipelined(items: Iterable[T], fn: Callable[[T], R], *, workers: int, depth: int) -> Iterator[R]:
    """`map(fn, items)` in order, with up to `depth` calls running in `workers` threads.

    The producer of `items` (the model) keeps running in the calling thread while earlier items
    are encoded, so the encoding overlaps the model (zlib releases the GIL).
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: deque[Future[R]] = deque()
        try:
            for item in items:
                queue.append(pool.submit(fn, item))
                while len(queue) >= depth or (queue and queue[0].done()):
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        finally:
            for fut in queue:
                fut.cancel()


def write_tiff(f: BinaryIO, strips: Iterable[np.ndarray], width: int, height: int, channels: int,
               parameters: str | None, imagegen: dict | None, *, level: int = TIFF_LEVEL) -> None:
    """Tiled Deflate BigTIFF from strips (see the module doc for where metadata goes).

    Tiles are compressed in `ENCODE_THREADS` threads while the strips are still being made.
    """
    import tifffile

    extratags = []
    if parameters:
        extratags.append((TAG_PARAMETERS, 7, None, parameters.encode("utf-8"), True))
    if imagegen is not None:
        extratags.append((TAG_IMAGEGEN, 7, None, strict_json(imagegen).encode("utf-8"), True))
    description = parameters.encode("ascii", "backslashreplace").decode("ascii") if parameters else None
    tiles_per_row = -(-width // TIFF_TILE)
    encoded = pipelined(
        _tiles(strips, width, height, channels),
        lambda tile: _encode_tile(tile, level),
        workers=ENCODE_THREADS,
        depth=max(2 * ENCODE_THREADS, 2 * tiles_per_row),
    )
    tifffile.imwrite(
        f,
        encoded,
        shape=(height, width, channels),
        dtype=np.uint8,
        tile=(TIFF_TILE, TIFF_TILE),
        photometric="rgb",
        extrasamples=("unassalpha",) if channels == 4 else None,
        compression="zlib",
        predictor=True,
        bigtiff=True,
        description=description,
        metadata=None,
        software="imagegen",
        extratags=extratags,
    )


def _paeth(rows: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """Paeth-filter `rows` (n x W*C uint8) given the row above the first; returns n x (1 + W*C)."""
    x = rows.astype(np.int16)
    b = np.concatenate([prev[None].astype(np.int16), x[:-1]])
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    c = np.zeros_like(x)
    c[:, bpp:] = b[:, :-bpp]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    out = np.empty((x.shape[0], x.shape[1] + 1), np.uint8)
    out[:, 0] = 4
    out[:, 1:] = (x - pred).astype(np.uint8)
    return out


def write_png(f: BinaryIO, strips: Iterable[np.ndarray], width: int, height: int, channels: int,
              parameters: str | None, imagegen: dict | None, *, level: int = PNG_LEVEL) -> None:
    """8-bit RGB/RGBA PNG streamed from strips, text chunks before the image data."""
    f.write(b"\x89PNG\r\n\x1a\n")
    color_type = {3: 2, 4: 6}[channels]
    f.write(png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)))
    if parameters:
        f.write(png_text_chunk("parameters", parameters))
    if imagegen is not None:
        f.write(png_text_chunk("imagegen", strict_json(imagegen)))
    comp = zlib.compressobj(level)
    pending = bytearray()
    rows_seen = 0

    def with_prev(strips: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal rows_seen
        prev = np.zeros(width * channels, np.uint8)
        for strip in strips:
            flat = strip.reshape(strip.shape[0], width * channels)
            yield flat, prev
            prev = flat[-1].copy()
            rows_seen += strip.shape[0]

    # One worker: the zlib stream is sequential, but it runs while the next strip is computed.
    for data in pipelined(
        with_prev(strips), lambda fp: comp.compress(_paeth(fp[0], fp[1], channels)), workers=1, depth=2
    ):
        pending += data
        while len(pending) >= PNG_IDAT_BYTES:
            f.write(png_chunk(b"IDAT", bytes(pending[:PNG_IDAT_BYTES])))
            del pending[:PNG_IDAT_BYTES]
    pending += comp.flush()
    if rows_seen != height:
        raise ValueError(f"strips gave {rows_seen} rows, expected {height}")
    for i in range(0, len(pending), PNG_IDAT_BYTES):
        f.write(png_chunk(b"IDAT", bytes(pending[i : i + PNG_IDAT_BYTES])))
    f.write(png_chunk(b"IEND", b""))


def write_jpeg(f: BinaryIO, strips: Iterable[np.ndarray], width: int, height: int, channels: int,
               parameters: str | None, imagegen: dict | None, *, quality: int = JPEG_QUALITY) -> None:
    """Baseline JPEG via Pillow (the whole image as one uint8 Pillow image, RGB only).

    Raises `InputError` for an alpha channel or a side over 65500.
    """
    from PIL import Image

    if channels != 3:
        raise InputError("`format` jpg cannot hold an alpha channel; use tif or png for RGBA images")
    if max(width, height) > JPEG_MAX_SIDE:
        raise InputError(f"`format` jpg allows at most {JPEG_MAX_SIDE} px per side; got {width}x{height}, use tif")
    canvas = Image.new("RGB", (width, height))
    y = 0
    for strip in strips:
        canvas.paste(Image.fromarray(strip), (0, y))
        y += strip.shape[0]
    if y != height:
        raise ValueError(f"strips gave {y} rows, expected {height}")
    exif = Image.Exif()
    if parameters:
        # EXIF UserComment with the UNICODE (UCS-2 big-endian) prefix, as A1111 writes it.
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + parameters.encode("utf-16-be")
    comment = strict_json(imagegen).encode("utf-8") if imagegen is not None else b""
    kwargs = {"comment": comment} if 0 < len(comment) <= 65000 else {}
    canvas.save(f, format="JPEG", quality=quality, exif=exif.tobytes(), **kwargs)


WRITERS = {"tif": write_tiff, "png": write_png, "jpg": write_jpeg}
