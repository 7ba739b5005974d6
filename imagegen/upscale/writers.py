"""Write an image that arrives as uint8 row strips, without holding it whole (except JPEG).

- TIFF: tiled (256x256) BigTIFF, Deflate (zlib) with horizontal predictor; tiles are compressed
  by us in a thread pool while the model makes the next strips, and tifffile writes the bytes. Metadata: ImageDescription (tag 270) holds the `parameters` text (ASCII;
  other characters as backslash escapes), private tag 65000 the exact `parameters` text as
  UTF-8, private tag 65001 the `imagegen` JSON as UTF-8.
- PNG: written by hand: IHDR, tEXt/iTXt (`parameters`, `imagegen`), IDAT, IEND. The Paeth
  filter is applied to every row and the filtered rows are deflated in segments of about
  `PNG_SEGMENT_BYTES`, in parallel (as pigz does): each segment is raw deflate primed with the
  32 KiB of filtered data before it and ended by a sync flush (byte-aligned, not final), the
  segments are joined behind one zlib header, then an empty final block and the Adler-32 of
  the whole data (combined from the segments' own). That is one valid zlib stream; its bytes
  depend on the pixels only (segment bounds follow the width), whatever the number of threads.
- JPEG: Pillow needs the whole image, so strips are pasted into one uint8 Pillow image (never
  float); `parameters` goes to EXIF UserComment, the `imagegen` JSON to a COM segment.

All writers take an open binary file; atomic naming is the caller's job.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np

from imagegen.defaults import JPEG_MAX_SIDE
from imagegen.errors import InputError
from imagegen.metadata import png_chunk, png_text_chunk, strict_json
from imagegen.upscale.stages import THREADS, pipelined

# Defaults, one place.
TIFF_TILE = 256  # TIFF tile side in pixels
TIFF_LEVEL = 6  # Deflate level for TIFF tiles
ENCODE_THREADS = THREADS  # threads compressing TIFF tiles and PNG segments
PNG_LEVEL = 6  # zlib level for PNG IDAT
PNG_IDAT_BYTES = 1 << 20  # flush compressed data in IDAT chunks of about this size
PNG_SEGMENT_BYTES = 4 << 20  # filtered bytes per independently deflated PNG segment
DEFLATE_WINDOW = 32768  # deflate's window: the dictionary each PNG segment is primed with
JPEG_QUALITY = 95
TAG_PARAMETERS = 65000  # private TIFF tag: `parameters` text, UTF-8
TAG_IMAGEGEN = 65001  # private TIFF tag: `imagegen` JSON, UTF-8


def _row_blocks(strips: Iterable[np.ndarray], rows: int, counted: list[int]) -> Iterator[np.ndarray]:
    """Regroup strips into blocks of `rows` rows (the last one may be shorter), each a new
    array; `counted[0]` adds up the rows received."""
    buf: np.ndarray | None = None
    filled = 0
    for strip in strips:
        counted[0] += strip.shape[0]
        if buf is None:
            buf = np.empty((rows, *strip.shape[1:]), np.uint8)
        pos = 0
        while pos < strip.shape[0]:
            n = min(rows - filled, strip.shape[0] - pos)
            buf[filled : filled + n] = strip[pos : pos + n]
            filled += n
            pos += n
            if filled == rows:
                yield buf.copy()
                filled = 0
    if filled and buf is not None:
        yield buf[:filled].copy()


def _tiles(strips: Iterable[np.ndarray], width: int, height: int, channels: int) -> Iterator[np.ndarray]:
    """Regroup full-width strips into TIFF_TILE x TIFF_TILE tiles, row-major, zero-padded."""
    t = TIFF_TILE
    rows_seen = [0]
    for band in _row_blocks(strips, t, rows_seen):
        padded = np.zeros((t, -(-width // t) * t, channels), np.uint8)
        padded[: band.shape[0], :width] = band
        for x in range(0, width, t):
            yield np.ascontiguousarray(padded[:, x : x + t])
    if rows_seen[0] != height:
        raise ValueError(f"strips gave {rows_seen[0]} rows, expected {height}")


def _encode_tile(tile: np.ndarray, level: int) -> bytes:
    """TIFF predictor 2 (horizontal differencing per sample, mod 256) then Deflate."""
    diff = tile.copy()
    np.subtract(tile[:, 1:], tile[:, :-1], out=diff[:, 1:])
    return zlib.compress(diff, level)


def write_tiff(f: BinaryIO, strips: Iterable[np.ndarray], width: int, height: int, channels: int,
               parameters: str | None, imagegen: dict | None, *, level: int = TIFF_LEVEL,
               workers: int = ENCODE_THREADS) -> None:
    """Tiled Deflate BigTIFF from strips (see the module doc for where metadata goes).

    Tiles are compressed in `workers` threads while the strips are still being made (0: in
    the calling thread; the file is the same).
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
        workers=workers,
        depth=max(2 * workers, 2 * tiles_per_row),
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


def adler32_combine(first: int, second: int, second_len: int) -> int:
    """Adler-32 of A + B from adler32(A), adler32(B) and len(B) (both sums are mod 65521:
    A's low sum is B's starting value, and every byte of B adds it once more to the high sum)."""
    mod = 65521
    a1, b1 = first & 0xFFFF, first >> 16
    a2, b2 = second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % mod
    b = (b1 + b2 + second_len * (a1 - 1)) % mod
    return (b << 16) | a


def _zlib_header(level: int) -> bytes:
    """The two-byte zlib header zlib itself writes for `level` (32 KiB window, deflate)."""
    flevel = 0 if level in (0, 1) else 1 if level < 6 else 2 if level in (6, -1) else 3
    head = (0x78 << 8) | (flevel << 6)
    return struct.pack(">H", head + 31 - head % 31)


def _png_segments(strips: Iterable[np.ndarray], width: int, channels: int,
                  counted: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Regroup full-width strips into (rows, context) segments of a fixed number of rows (from
    the width only). `context` is None for the first segment, else the raw rows just before
    it: enough for the last `DEFLATE_WINDOW` filtered bytes, plus the row above those."""
    row_bytes = width * channels
    seg_rows = max(1, PNG_SEGMENT_BYTES // row_bytes)
    ctx_rows = -(-DEFLATE_WINDOW // (row_bytes + 1)) + 1
    flat = (strip.reshape(strip.shape[0], row_bytes) for strip in strips)
    context: np.ndarray | None = None
    for rows in _row_blocks(flat, seg_rows, counted):
        yield rows, context
        context = rows[-ctx_rows:] if context is None or len(rows) >= ctx_rows else \
            np.concatenate([context, rows])[-ctx_rows:]


def _deflate_segment(rows: np.ndarray, context: np.ndarray | None, level: int, channels: int) -> tuple[bytes, int, int]:
    """Paeth-filter and raw-deflate one segment: (deflate bytes ending in a sync flush,
    Adler-32 and length of its filtered bytes). The window is primed with the filtered bytes
    before the segment, recomputed from `context`, so back-references may reach into them (a
    dictionary that is only a suffix of the data before, near the top, is still exact)."""
    zdict = b""
    if context is None:
        prev = np.zeros(rows.shape[1], np.uint8)
    else:
        prev = context[-1]
        if len(context) > 1:  # the context rows filtered again (the row above them is the first)
            zdict = _paeth(context[1:], context[0], channels).tobytes()[-DEFLATE_WINDOW:]
    data = _paeth(rows, prev, channels)
    comp = zlib.compressobj(level, zlib.DEFLATED, -15, **({"zdict": zdict} if zdict else {}))
    out = comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)
    return out, zlib.adler32(data), data.size


def write_png(f: BinaryIO, strips: Iterable[np.ndarray], width: int, height: int, channels: int,
              parameters: str | None, imagegen: dict | None, *, level: int = PNG_LEVEL,
              workers: int = ENCODE_THREADS) -> None:
    """8-bit RGB/RGBA PNG streamed from strips, text chunks before the image data.

    Segments are filtered and deflated in `workers` threads (0: in the calling thread; the
    file is the same, see the module doc).
    """
    f.write(b"\x89PNG\r\n\x1a\n")
    color_type = {3: 2, 4: 6}[channels]
    f.write(png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)))
    if parameters:
        f.write(png_text_chunk("parameters", parameters))
    if imagegen is not None:
        f.write(png_text_chunk("imagegen", strict_json(imagegen)))
    pending = bytearray(_zlib_header(level))
    adler = 1
    rows_seen = [0]
    segments = _png_segments(strips, width, channels, rows_seen)
    for data, seg_adler, seg_len in pipelined(
        segments, lambda seg: _deflate_segment(seg[0], seg[1], level, channels), workers=workers, depth=2 * workers
    ):
        adler = adler32_combine(adler, seg_adler, seg_len)
        pending += data
        while len(pending) >= PNG_IDAT_BYTES:
            f.write(png_chunk(b"IDAT", bytes(pending[:PNG_IDAT_BYTES])))
            del pending[:PNG_IDAT_BYTES]
    if rows_seen[0] != height:
        raise ValueError(f"strips gave {rows_seen[0]} rows, expected {height}")
    pending += zlib.compressobj(level, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty final block
    pending += struct.pack(">I", adler)
    for i in range(0, len(pending), PNG_IDAT_BYTES):
        f.write(png_chunk(b"IDAT", bytes(pending[i : i + PNG_IDAT_BYTES])))
    f.write(png_chunk(b"IEND", b""))


def write_jpeg(f: BinaryIO, strips: Iterable[np.ndarray], width: int, height: int, channels: int,
               parameters: str | None, imagegen: dict | None, *, quality: int = JPEG_QUALITY,
               workers: int = 0) -> None:
    """Baseline JPEG via Pillow (the whole image as one uint8 Pillow image, RGB only; `workers`
    is unused: Pillow encodes in one call).

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
