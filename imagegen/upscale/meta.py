"""Metadata in and out: the A1111 `parameters` text and the `imagegen` JSON provenance."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagegen.metadata import a1111_quote, read_png_text
from imagegen.upscale.plan import UpscalePlan


@contextlib.contextmanager
def allow_huge_images() -> Iterator[None]:
    """Let Pillow open images over its ~179 MP decompression-bomb limit inside the block."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def source_metadata(info: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """`parameters` text and parsed `imagegen` JSON from a Pillow `info` dict (either may be None)."""
    params = info.get("parameters")
    params = params if isinstance(params, str) and params.strip() else None
    raw = info.get("imagegen")
    data: dict[str, Any] | None = None
    if isinstance(raw, (str, bytes)):
        try:
            parsed = json.loads(raw)
            data = parsed if isinstance(parsed, dict) else {"source_imagegen": parsed}
        except ValueError:
            data = {"source_imagegen_unparsed": raw if isinstance(raw, str) else raw.decode("utf-8", "replace")}
    return params, data


def upscale_note(name: str, short_hash: str, plan: UpscalePlan) -> str:
    """A1111-style fields appended to the `parameters` text, e.g.
    `Upscaler: RealESRGAN_x4plus, Upscaler hash: 0123456789, Upscale passes: 2 (x4 6144x4096;
    lanczos 4250x2834; x4 17000x11336; lanczos 17000x11333), Final size: 17000x11333`."""
    w, h = plan.final_size
    return (
        f"Upscaler: {a1111_quote(name)}, Upscaler hash: {short_hash}, "
        f"Upscale passes: {a1111_quote(f'{plan.passes} ({plan.note()})')}, Final size: {w}x{h}"
    )


def with_note(parameters: str | None, note: str) -> str:
    """Append `note` to the last (key: value) line of `parameters`, or return it alone."""
    if not parameters:
        return note
    text = parameters.rstrip("\n")
    return f"{text}, {note}"


def read_metadata(path: str | Path) -> dict[str, Any]:
    """`{"parameters": str | None, "imagegen": dict | None}` from an output written by `upscale_image`.

    Reads PNG text chunks, the TIFF private tags 65000/65001, or JPEG EXIF UserComment + COM.
    Raises `ValueError` for another file type.
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith(b"\x89PNG"):
        text = read_png_text(path)
        return {"parameters": text.get("parameters"),
                "imagegen": json.loads(text["imagegen"]) if "imagegen" in text else None}
    if magic[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        import tifffile

        from imagegen.upscale.writers import TAG_IMAGEGEN, TAG_PARAMETERS

        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            p = tags.get(TAG_PARAMETERS)
            j = tags.get(TAG_IMAGEGEN)
            return {"parameters": bytes(p.value).decode("utf-8") if p else None,
                    "imagegen": json.loads(bytes(j.value).decode("utf-8")) if j else None}
    if magic[:2] == b"\xff\xd8":
        from PIL import Image

        with allow_huge_images(), Image.open(path) as im:
            comment = im.info.get("comment")
            uc = im.getexif().get_ifd(0x8769).get(0x9286)
        params = None
        if isinstance(uc, bytes) and uc.startswith(b"UNICODE\0"):
            params = uc[8:].decode("utf-16-be")
        elif isinstance(uc, str):
            params = uc
        return {"parameters": params, "imagegen": json.loads(comment) if comment else None}
    raise ValueError(f"{path}: not a PNG, TIFF or JPEG file")
