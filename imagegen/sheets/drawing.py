"""Drawing and writing contact-sheet pages: paged JPEG grids of thumbnails.

Sheets are built from the thumbnails under `thumbs/` only; a full render is never decoded.
Each cell shows the thumbnail, the job index in large type and a short caption of the axes
that vary. Layouts: a plain grid, sections per value of one axis (`by`), or a labelled X/Y
grid (`x`, `y`) like A1111's X/Y plot. Pages are capped in images and in megapixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen.defaults import MAX_SHEET_SIDE
from imagegen.errors import InputError
from imagegen.fsutil import write_atomic
from imagegen.sheets.items import (
    SHEET_NAME, SheetItem, axis_values, caption_axes, caption_for, check_axis, energy_note, list_sheets, sheet_name,
    varying_axes,
)
from imagegen.sheets.layout import (
    BAND_FONT, CAPTION_FONT, CAPTION_LINES, GAP, INDEX_FONT, LABEL_FONT, LABEL_LINES, MARGIN, ROW_LABEL_WIDTH, TEXT_FONT,
    INPUT_AXIS, INPUT_CAPTION, TITLE_FONT, Geometry, Page, Row, grid_sections, group, legend_lines, line_height, paginate,
    plain_sections,
)
from imagegen.thumbs import THUMB_SIZE

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

JPEG_QUALITY = 85  # sheet pages are mostly thumbnails: 85 keeps text crisp and files small

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)
BOX = (236, 236, 236)  # behind thumbnails that are not square, and missing ones
BAND = (225, 232, 245)  # section band background
PICKED = (230, 120, 0)  # frame around picked cells

# --- drawing ----------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A scalable font: DejaVu Sans where installed (wide Unicode coverage for prompts), else
    Pillow's built-in one (needs FreeType), else Pillow's small bitmap font."""
    from PIL import ImageFont

    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType
        return ImageFont.load_default()


LEGEND_WRAP_LINES = 40  # header lines at most, once the legend is wrapped to the page width


def wrap_legend(lines: list[str], width: float) -> list[str]:
    """Legend lines word-wrapped to `width` pixels of header text, LEGEND_WRAP_LINES at most."""
    return [piece for line in lines for piece in _wrap(line, TEXT_FONT, width, LEGEND_WRAP_LINES)][:LEGEND_WRAP_LINES]


def _width(text: str, size: int) -> float:
    return _font(size).getlength(text)


def _ellipsize(text: str, size: int, width: float) -> str:
    """`text`, cut with "…" so that it fits in `width` pixels."""
    if _width(text, size) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if _width(text[:mid].rstrip() + "…", size) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


def _wrap(text: str, size: int, width: float, max_lines: int) -> list[str]:
    """Word-wrap `text` into at most `max_lines` lines of `width` pixels; the last is cut with "…"."""
    words = text.split()
    lines: list[str] = []
    current = ""
    for i, word in enumerate(words):
        trial = f"{current} {word}".strip()
        if _width(trial, size) <= width or not current:
            current = trial
            continue
        lines.append(current)
        current = word
        if len(lines) == max_lines - 1:
            current = " ".join(words[i:])
            break
    if current:
        lines.append(current)
    return [_ellipsize(line, size, width) for line in lines[:max_lines]]


def _load_thumb(path: Path) -> Image.Image | None:
    """The thumbnail at `path` as RGB, fitted to THUMB_SIZE; None if missing or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
            thumb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if max(thumb.size) > THUMB_SIZE:
        thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    return thumb


def _draw_cell(
    page: Image.Image, draw: ImageDraw.ImageDraw, item: SheetItem, left: int, top: int, geo: Geometry, caption: str
) -> None:
    thumb = _load_thumb(item.thumb)
    draw.rectangle((left, top, left + THUMB_SIZE - 1, top + THUMB_SIZE - 1), fill=BOX)
    if thumb is None:
        text = "no thumbnail"
        draw.text(
            (left + (THUMB_SIZE - _width(text, CAPTION_FONT)) / 2, top + THUMB_SIZE / 2 - 8),
            text, font=_font(CAPTION_FONT), fill=MUTED,
        )
    else:
        page.paste(thumb, (left + (THUMB_SIZE - thumb.width) // 2, top + (THUMB_SIZE - thumb.height) // 2))
    if item.picked:
        draw.rectangle((left - 5, top - 5, left + THUMB_SIZE + 4, top + geo.cell_height - 2), outline=PICKED, width=4)
    y = top + THUMB_SIZE + 2
    draw.text((left, y), str(item.index), font=_font(INDEX_FONT), fill=INK, stroke_width=1, stroke_fill=INK)
    if item.picked:
        tag = "picked"
        draw.text(
            (left + THUMB_SIZE - _width(tag, CAPTION_FONT), y + 10), tag, font=_font(CAPTION_FONT), fill=PICKED
        )
    y += line_height(INDEX_FONT)
    for line in _wrap(caption, CAPTION_FONT, THUMB_SIZE, geo.caption_lines) if geo.caption_lines else []:
        draw.text((left, y), line, font=_font(CAPTION_FONT), fill=MUTED)
        y += line_height(CAPTION_FONT)


def _draw_input(page: Image.Image, draw: ImageDraw.ImageDraw, photo: tuple[Path, str], left: int, top: int,
                geo: Geometry) -> None:
    """The input photo's thumbnail in the left column, "input photo" and its name under it."""
    thumb = _load_thumb(photo[0])
    draw.rectangle((left, top, left + THUMB_SIZE - 1, top + THUMB_SIZE - 1), fill=BOX)
    if thumb is not None:
        page.paste(thumb, (left + (THUMB_SIZE - thumb.width) // 2, top + (THUMB_SIZE - thumb.height) // 2))
    draw.rectangle((left - 3, top - 3, left + THUMB_SIZE + 2, top + THUMB_SIZE + 2), outline=MUTED, width=2)
    y = top + THUMB_SIZE + 4
    draw.text((left, y), INPUT_CAPTION, font=_font(CAPTION_FONT), fill=INK)
    for line in _wrap(photo[1], CAPTION_FONT, THUMB_SIZE, 1):
        y += line_height(CAPTION_FONT)
        draw.text((left, y), line, font=_font(CAPTION_FONT), fill=MUTED)


def _render_page(
    page_plan: Page, number: int, total: int, title: str, legend: list[str], geo: Geometry,
    captions: dict[int, str],
) -> Image.Image:
    from PIL import Image, ImageDraw

    height = geo.header_height + MARGIN
    for kind, _ in page_plan.blocks:
        height += {"band": geo.band_height, "columns": geo.columns_height, "row": geo.row_height}[kind]
    page = Image.new("RGB", (geo.width, height), BACKGROUND)
    draw = ImageDraw.Draw(page)

    # 1. Header: title, page number, summary and legend.
    page_label = f"page {number}/{total}"
    title_room = geo.width - 2 * MARGIN - _width(page_label, TITLE_FONT) - 30
    draw.text((MARGIN, MARGIN), _ellipsize(title, TITLE_FONT, title_room), font=_font(TITLE_FONT), fill=INK,
              stroke_width=1, stroke_fill=INK)
    draw.text((geo.width - MARGIN - _width(page_label, TITLE_FONT), MARGIN), page_label, font=_font(TITLE_FONT),
              fill=INK)
    y = MARGIN + line_height(TITLE_FONT)
    indices = [item.index for item in page_plan.items]
    lines = list(legend)
    if indices:
        lines[0] += f" · this page: {len(indices)} images, #{min(indices)} to #{max(indices)}"
        energy = energy_note(page_plan.items)
        if energy:
            lines[0] += f", {energy}"
    for line in lines:
        draw.text((MARGIN, y), _ellipsize(line, TEXT_FONT, geo.width - 2 * MARGIN), font=_font(TEXT_FONT), fill=MUTED)
        y += line_height(TEXT_FONT)
    y = geo.header_height - 8
    draw.line((MARGIN, y, geo.width - MARGIN, y), fill=MUTED, width=1)
    y = geo.header_height

    # 2. Sections: bands, X/Y column labels, rows of cells (the input photo left of a section's first row).
    cells_left = MARGIN + geo.input_width + geo.label_width
    for kind, block in page_plan.blocks:
        if kind == "band":
            draw.rectangle((MARGIN, y, geo.width - MARGIN, y + geo.band_height - 8), fill=BAND)
            text = _ellipsize(str(block), BAND_FONT, geo.width - 2 * MARGIN - 16)
            draw.text((MARGIN + 8, y + 3), text, font=_font(BAND_FONT), fill=INK)
            y += geo.band_height
        elif kind == "columns":
            for c, label in enumerate(block):  # type: ignore[arg-type]
                left = cells_left + c * (THUMB_SIZE + GAP)
                wrapped = _wrap(label, LABEL_FONT, THUMB_SIZE, geo.label_lines)
                ly = y + geo.columns_height - 6 - len(wrapped) * line_height(LABEL_FONT)  # bottom-aligned
                for line in wrapped:
                    draw.text((left + (THUMB_SIZE - _width(line, LABEL_FONT)) / 2, ly), line,
                              font=_font(LABEL_FONT), fill=INK)
                    ly += line_height(LABEL_FONT)
            y += geo.columns_height
        else:
            row: Row = block  # type: ignore[assignment]
            if row.input is not None and geo.input_width:
                _draw_input(page, draw, row.input, MARGIN, y, geo)
            if row.label is not None and geo.label_width:
                max_lines = max(1, (THUMB_SIZE) // line_height(LABEL_FONT))
                ly = y + THUMB_SIZE // 2 - line_height(LABEL_FONT)
                for line in _wrap(row.label, LABEL_FONT, geo.label_width - 12, max_lines):
                    draw.text((MARGIN + geo.input_width, ly), line, font=_font(LABEL_FONT), fill=INK)
                    ly += line_height(LABEL_FONT)
            for c, item in enumerate(row.cells):
                if item is not None:
                    _draw_cell(page, draw, item, cells_left + c * (THUMB_SIZE + GAP), y, geo, captions[item.index])
            y += geo.row_height
    return page


def write_sheets(
    items: Sequence[SheetItem],
    out_dir: Path,
    *,
    title: str,
    by: str | None = None,
    x: str | None = None,
    y: str | None = None,
    max_per_page: int = 100,
    max_megapixels: float = 40.0,
    drop_stale: bool = True,
    inputs: Mapping[str, Path] | None = None,
) -> list[Path]:
    """Write contact-sheet pages `sheet-01.jpg`, ... into `out_dir` and return their paths.

    Each page is written atomically; sheets numbered past the last page (from an earlier,
    larger run) are removed (unless `drop_stale` is False: then `drop_stale_sheets` later). `by` starts a section per value of that axis; `x`/`y` lay out a
    labelled grid, with the other varying axes making separate grids. A missing or unreadable
    thumbnail is drawn as a grey "no thumbnail" box. `inputs` maps each value of the `input`
    axis (a job's input photo) to its thumbnail: without `by`, `x` or `y` on that axis, the
    sheets then have a section per input photo, its thumbnail left of the section's renders.
    Raises InputError for an unknown axis
    name, the same axis twice, or caps too small for one row of cells; ValueError if two
    items share an index; OSError if `out_dir` cannot be written.
    """
    from PIL import Image  # noqa: F401  (fail here, not half-way, if Pillow is missing)

    # 1. Check inputs.
    out_dir = Path(out_dir)
    items = sorted(items, key=lambda item: item.index)
    if len({item.index for item in items}) != len(items):
        raise ValueError("write_sheets: two items share a job index")
    known = list(axis_values(items))
    for option, name in (("by", by), ("x", x), ("y", y)):
        check_axis(option, name, known)
    if x is not None and x == y:
        raise InputError(f"sheet: --x and --y are both {x!r}; pick two different axes")
    for option, name in (("x", x), ("y", y)):
        if by is not None and name == by:
            raise InputError(f"sheet: --by and --{option} are both {by!r}; pick different axes")
    if max_per_page < 1:
        raise InputError(f"sheet: max images per page must be at least 1, got {max_per_page}")
    if max_megapixels <= 0:
        raise InputError(f"sheet: max megapixels per page must be positive, got {max_megapixels}")

    # 2. A section per input photo unless the axes say otherwise; captions name the varying
    #    axes not already shown by a band or grid label.
    inputs = {k: Path(v) for k, v in (inputs or {}).items()} if INPUT_AXIS in known else {}
    if inputs and by is None and INPUT_AXIS not in (x, y):
        by = INPUT_AXIS
    varying = varying_axes(items)
    grid = x is not None or y is not None
    # In a grid, every varying axis is on a band or a row/column label already.
    shown_elsewhere = set(varying) if grid else {by}
    on_caption = caption_axes(items, exclude=list(shown_elsewhere))
    captions = {item.index: caption_for(item, on_caption) for item in items}
    caption_lines = CAPTION_LINES if any(captions.values()) else 0
    others = [name for name in varying if name not in (by, x, y)]
    layout = ""
    if by:
        layout += f" · a section per {by}"
    if grid:
        layout += f" · columns: {x or ' · '.join(others) or '-'} · rows: {y or ' · '.join(others) or '-'}"

    # 3. Pick the number of columns: about square pages, within both caps.
    max_pixels = max_megapixels * 1_000_000
    legend = legend_lines(items, varying, layout)
    legend_count = len(legend)
    input_width = THUMB_SIZE + GAP if inputs else 0
    probe = Geometry(1, ROW_LABEL_WIDTH if grid else 0, caption_lines, legend_count, input_width=input_width)
    if grid:
        want = max(len(s.columns or []) for s in grid_sections(items, x, y, by, others, 10**9)) if items else 1
    else:
        # About square for a full page; no wider than the largest section.
        largest = max((len(g) for g in group(items, [by]).values()), default=1) if by else max(len(items), 1)
        target = min(max_per_page, max(len(items), 1))
        want = round(math.sqrt(target * probe.row_height / (THUMB_SIZE + GAP)))
        want = min(max(want, 1), target, largest)
    columns = max(1, min(want, max_per_page))

    def fits(geo: Geometry) -> bool:
        smallest_page = geo.header_height + geo.band_height + geo.columns_height * grid + geo.row_height + MARGIN
        return geo.width <= MAX_SHEET_SIDE and geo.width * smallest_page <= max_pixels

    geo = Geometry(columns, probe.label_width, caption_lines, legend_count, input_width=input_width)
    while columns > 1 and not fits(geo):
        columns -= 1
        geo = Geometry(columns, probe.label_width, caption_lines, legend_count, input_width=input_width)
    if not fits(geo):
        need = geo.width * (geo.header_height + geo.band_height + geo.columns_height + geo.row_height + MARGIN)
        raise InputError(
            f"sheet: max megapixels per page {max_megapixels:g} is too small; one row needs {need / 1e6:.2f}"
        )
    # The legend is wrapped to the page width, not cut: every value of every varying axis is
    # listed (a 12-prompt legend shows #10-#12 too), up to LEGEND_WRAP_LINES lines in all.
    wrapped = wrap_legend(legend, geo.width - 2 * MARGIN)
    if len(wrapped) != len(legend):
        legend, legend_count = wrapped, len(wrapped)
        geo = Geometry(columns, geo.label_width, caption_lines, legend_count, input_width=input_width)
    max_height = min(MAX_SHEET_SIDE, int(max_pixels // geo.width))

    # 4. Lay out sections and flow them onto pages.
    if grid:
        sections = grid_sections(items, x, y, by, others, columns, inputs)
        label_lines = max(
            (len(_wrap(label, LABEL_FONT, THUMB_SIZE, LABEL_LINES)) for s in sections for label in s.columns or []),
            default=1,
        )
        geo = Geometry(columns, geo.label_width, caption_lines, legend_count, label_lines, input_width)
    else:
        sections = plain_sections(items, by, columns, inputs)
    pages = paginate(sections, geo, max_height, max_per_page) if items else []

    # 5. Draw and write each page, then drop stale pages from an earlier run.
    paths: list[Path] = []
    for number, plan in enumerate(pages, start=1):
        image = _render_page(plan, number, len(pages), title, legend, geo, captions)
        path = out_dir / sheet_name(number)
        write_atomic(path, lambda handle, im=image: im.save(handle, format="JPEG", quality=JPEG_QUALITY))
        paths.append(path)
    if drop_stale:
        drop_stale_sheets(out_dir, len(pages))
    return paths


def drop_stale_sheets(out_dir: Path, pages: int) -> None:
    """Delete the sheet pages numbered above `pages` (left by an earlier, longer set)."""
    for old in list_sheets(out_dir):
        if int(SHEET_NAME.match(old.name).group(1)) > pages:  # type: ignore[union-attr]
            old.unlink(missing_ok=True)
