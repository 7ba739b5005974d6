"""Contact sheets: paged JPEG grids of thumbnails, and the HTML index beside them.

Sheets are built from the thumbnails under `thumbs/` only; a full render is never decoded.
Each cell shows the thumbnail, the job index in large type and a short caption of the axes
that vary. Layouts: a plain grid, sections per value of one axis (`by`), or a labelled X/Y
grid (`x`, `y`) like A1111's X/Y plot. Pages are capped in images and in megapixels.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen.errors import InputError
from imagegen.fsutil import write_atomic
from imagegen.thumbs import THUMB_SIZE

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

# Layout, in pixels. The cell is laid out for THUMB_SIZE thumbnails.
MARGIN = 24  # page border
GAP = 14  # space between cells, both ways
INDEX_FONT = 34  # job index under each thumbnail: large enough to read on a zoomed-out page
CAPTION_FONT = 15  # caption lines under the index
CAPTION_LINES = 2  # caption lines per cell (the last one ends in "…" if cut)
TITLE_FONT = 34  # recipe title and "page i/n"
TEXT_FONT = 17  # summary and legend lines in the header
BAND_FONT = 22  # section band ("seed = 1234")
LABEL_FONT = 22  # X/Y grid column and row labels
LABEL_LINES = 3  # lines for one X/Y label before it is cut
ROW_LABEL_WIDTH = 200  # left column for X/Y row labels
LEGEND_LINES = 8  # varying axes listed in the header before "and N more"
MAX_SIDE = 16_000  # no page side longer than this: JPEG allows 65,535; viewers like less
JPEG_QUALITY = 85  # sheet pages are mostly thumbnails: 85 keeps text crisp and files small

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)
BOX = (236, 236, 236)  # behind thumbnails that are not square, and missing ones
BAND = (225, 232, 245)  # section band background
PICKED = (230, 120, 0)  # frame around picked cells

MISSING = "(none)"  # value label of an axis that a job does not have


@dataclass(frozen=True)
class SheetItem:
    """One rendered job as the sheets see it: where its files are and its value on each axis."""

    index: int
    job_id: str
    thumb: Path
    image: Path
    axes: dict[str, str] = field(hash=False)  # axis name -> value label for this job
    caption: str = ""  # short caption; if empty, built from the axes that vary across items
    picked: bool = False


# --- axes -------------------------------------------------------------------------------


def axis_values(items: Sequence[SheetItem]) -> dict[str, list[str]]:
    """Every axis name -> its distinct value labels, both in order of first appearance."""
    values: dict[str, dict[str, None]] = {}
    for item in items:
        for name in item.axes:
            values.setdefault(name, {})
    for item in sorted(items, key=lambda it: it.index):
        for name, seen in values.items():
            seen.setdefault(item.axes.get(name, MISSING), None)
    return {name: list(seen) for name, seen in values.items()}


def varying_axes(items: Sequence[SheetItem]) -> list[str]:
    """Names of the axes that take more than one value across `items`."""
    return [name for name, values in axis_values(items).items() if len(values) > 1]


def caption_axes(items: Sequence[SheetItem], exclude: Sequence[str | None] = ()) -> list[str]:
    """The varying axes for captions, short values first (a seed is not cut off behind a prompt)."""
    values = axis_values(items)
    longest = {name: max(len(v) for v in vals) for name, vals in values.items()}
    return sorted((n for n in varying_axes(items) if n not in exclude), key=lambda n: longest[n])


def caption_for(item: SheetItem, axes: Sequence[str]) -> str:
    """`item.caption` if set, else `name value` for each axis in `axes`, joined by ` · `."""
    if item.caption:
        return item.caption
    return " · ".join(f"{name} {item.axes.get(name, MISSING)}" for name in axes)


def _check_axis(option: str, name: str | None, known: Sequence[str]) -> None:
    """Raise InputError naming the option if `name` is not one of the run's axes."""
    if name is None or name in known:
        return
    hint = difflib.get_close_matches(name, known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    listed = ", ".join(known) if known else "none: every job has the same settings"
    raise InputError(f"sheet --{option}: unknown axis {name!r}{suggestion}; axes in this run: {listed}")


# --- layout -----------------------------------------------------------------------------


@dataclass
class _Row:
    label: str | None  # X/Y row label at the left
    cells: list[SheetItem | None]  # None: an empty grid cell


@dataclass
class _Section:
    label: str | None  # band text; None: no band
    columns: list[str] | None  # X/Y column labels; None: plain cells
    rows: list[_Row]


@dataclass
class _Page:
    blocks: list[tuple[str, object]] = field(default_factory=list)  # ("band", str) ("columns", list) ("row", _Row)
    items: list[SheetItem] = field(default_factory=list)


def _chunks(seq: Sequence, size: int) -> list[Sequence]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _combo_label(item: SheetItem, axes: Sequence[str]) -> str:
    return " · ".join(f"{name} {item.axes.get(name, MISSING)}" for name in axes)


def _group(items: Sequence[SheetItem], axes: Sequence[str]) -> dict[tuple[str, ...], list[SheetItem]]:
    """Items grouped by their values on `axes`, groups in order of first appearance."""
    groups: dict[tuple[str, ...], list[SheetItem]] = {}
    for item in items:
        groups.setdefault(tuple(item.axes.get(a, MISSING) for a in axes), []).append(item)
    return groups


def _plain_sections(items: Sequence[SheetItem], by: str | None, columns: int) -> list[_Section]:
    if by is None:
        return [_Section(None, None, [_Row(None, list(c)) for c in _chunks(items, columns)])]
    return [
        _Section(f"{by} = {key[0]}", None, [_Row(None, list(c)) for c in _chunks(members, columns)])
        for key, members in _group(items, [by]).items()
    ]


def _grid_sections(
    items: Sequence[SheetItem],
    x: str | None,
    y: str | None,
    by: str | None,
    others: Sequence[str],
    max_columns: int,
) -> list[_Section]:
    """X/Y grids: one per combination of the group axes, split into column chunks if wide.

    With both `x` and `y`, every other varying axis (and `by`) makes separate grids. With
    only one of them, the other direction holds the combinations of the remaining axes.
    """
    group_axes = ([by] if by else []) + (list(others) if x and y else [])
    rest = [] if x and y else list(others)

    def col_key(item: SheetItem) -> str:
        return f"{x} = {item.axes.get(x, MISSING)}" if x else _combo_label(item, rest)

    def row_key(item: SheetItem) -> str:
        return f"{y} = {item.axes.get(y, MISSING)}" if y else _combo_label(item, rest)

    sections: list[_Section] = []
    for key, members in _group(items, group_axes).items():
        group_label = " · ".join(f"{a} = {v}" for a, v in zip(group_axes, key)) or None
        # Several jobs on the same (x, y) cell (axes that do not tell them apart): later
        # ones go to further layers of the grid rather than being dropped.
        layers: list[dict[tuple[str, str], SheetItem]] = []
        for item in members:
            cell = (col_key(item), row_key(item))
            for layer in layers:
                if cell not in layer:
                    layer[cell] = item
                    break
            else:
                layers.append({cell: item})
        col_values = list(dict.fromkeys(col_key(it) for it in members))
        row_values = list(dict.fromkeys(row_key(it) for it in members))
        n_chunks = math.ceil(len(col_values) / max_columns)
        chunk = math.ceil(len(col_values) / n_chunks)
        for layer_no, layer in enumerate(layers, start=1):
            for chunk_no, cols in enumerate(_chunks(col_values, chunk), start=1):
                rows = [
                    _Row(row_value, [layer.get((col, row_value)) for col in cols])
                    for row_value in row_values
                ]
                rows = [row for row in rows if any(row.cells)]
                if not rows:
                    continue
                parts = [group_label] if group_label else []
                if len(layers) > 1:
                    parts.append(f"layer {layer_no}/{len(layers)}")
                if n_chunks > 1:
                    parts.append(f"columns {chunk_no}/{n_chunks}")
                sections.append(_Section(" · ".join(parts) or None, list(cols), rows))
    return sections


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


def _line_height(size: int) -> int:
    return round(size * 1.25)


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


@dataclass(frozen=True)
class _Geometry:
    columns: int
    label_width: int  # X/Y row labels; 0 without
    caption_lines: int
    header_lines: int  # summary + legend lines under the title
    label_lines: int = LABEL_LINES  # lines of the tallest X/Y column label

    @property
    def cell_width(self) -> int:
        return THUMB_SIZE

    @property
    def cell_height(self) -> int:
        captions = self.caption_lines * _line_height(CAPTION_FONT)
        return THUMB_SIZE + 4 + _line_height(INDEX_FONT) + captions

    @property
    def width(self) -> int:
        cells = self.columns * THUMB_SIZE + (self.columns - 1) * GAP
        return 2 * MARGIN + self.label_width + cells

    @property
    def header_height(self) -> int:
        return MARGIN + _line_height(TITLE_FONT) + self.header_lines * _line_height(TEXT_FONT) + 16

    @property
    def band_height(self) -> int:
        return _line_height(BAND_FONT) + 14

    @property
    def columns_height(self) -> int:
        return self.label_lines * _line_height(LABEL_FONT) + 6

    @property
    def row_height(self) -> int:
        return self.cell_height + GAP


def _legend(items: Sequence[SheetItem], varying: Sequence[str], layout: str) -> list[str]:
    """Header lines under the title: a summary, one line per varying axis, the fixed axes."""
    values = axis_values(items)
    lines = [f"{len(items)} images{layout}"]
    shown = list(varying[:LEGEND_LINES])
    for name in shown:
        vals = values[name]
        lines.append(f"{name} ({len(vals)}): " + ", ".join(vals))
    if len(varying) > len(shown):
        lines.append(f"and {len(varying) - len(shown)} more varying axes: " + ", ".join(varying[len(shown) :]))
    fixed = [f"{name} {vals[0]}" for name, vals in values.items() if len(vals) == 1]
    if fixed:
        lines.append("same for all: " + " · ".join(fixed))
    return lines


def _draw_cell(
    page: Image.Image, draw: ImageDraw.ImageDraw, item: SheetItem, left: int, top: int, geo: _Geometry, caption: str
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
    y += _line_height(INDEX_FONT)
    for line in _wrap(caption, CAPTION_FONT, THUMB_SIZE, geo.caption_lines) if geo.caption_lines else []:
        draw.text((left, y), line, font=_font(CAPTION_FONT), fill=MUTED)
        y += _line_height(CAPTION_FONT)


def _render_page(
    page_plan: _Page, number: int, total: int, title: str, legend: list[str], geo: _Geometry,
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
    y = MARGIN + _line_height(TITLE_FONT)
    indices = [item.index for item in page_plan.items]
    lines = list(legend)
    if indices:
        lines[0] += f" · this page: {len(indices)} images, #{min(indices)} to #{max(indices)}"
    for line in lines:
        draw.text((MARGIN, y), _ellipsize(line, TEXT_FONT, geo.width - 2 * MARGIN), font=_font(TEXT_FONT), fill=MUTED)
        y += _line_height(TEXT_FONT)
    y = geo.header_height - 8
    draw.line((MARGIN, y, geo.width - MARGIN, y), fill=MUTED, width=1)
    y = geo.header_height

    # 2. Sections: bands, X/Y column labels, rows of cells.
    cells_left = MARGIN + geo.label_width
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
                ly = y + geo.columns_height - 6 - len(wrapped) * _line_height(LABEL_FONT)  # bottom-aligned
                for line in wrapped:
                    draw.text((left + (THUMB_SIZE - _width(line, LABEL_FONT)) / 2, ly), line,
                              font=_font(LABEL_FONT), fill=INK)
                    ly += _line_height(LABEL_FONT)
            y += geo.columns_height
        else:
            row: _Row = block  # type: ignore[assignment]
            if row.label is not None and geo.label_width:
                max_lines = max(1, (THUMB_SIZE) // _line_height(LABEL_FONT))
                ly = y + THUMB_SIZE // 2 - _line_height(LABEL_FONT)
                for line in _wrap(row.label, LABEL_FONT, geo.label_width - 12, max_lines):
                    draw.text((MARGIN, ly), line, font=_font(LABEL_FONT), fill=INK)
                    ly += _line_height(LABEL_FONT)
            for c, item in enumerate(row.cells):
                if item is not None:
                    _draw_cell(page, draw, item, cells_left + c * (THUMB_SIZE + GAP), y, geo, captions[item.index])
            y += geo.row_height
    return page


def _paginate(
    sections: Sequence[_Section], geo: _Geometry, max_height: int, max_per_page: int
) -> list[_Page]:
    """Flow sections onto pages; a section cut by a page break repeats its band and labels."""
    pages = [_Page()]
    used = geo.header_height + MARGIN

    def heading(section: _Section, continued: bool) -> list[tuple[str, object]]:
        blocks: list[tuple[str, object]] = []
        if section.label is not None:
            blocks.append(("band", section.label + (" (continued)" if continued else "")))
        if section.columns is not None:
            blocks.append(("columns", section.columns))
        return blocks

    def height(blocks: list[tuple[str, object]]) -> int:
        sizes = {"band": geo.band_height, "columns": geo.columns_height, "row": geo.row_height}
        return sum(sizes[kind] for kind, _ in blocks)

    for section in sections:
        for row_no, row in enumerate(section.rows):
            page = pages[-1]
            members = [item for item in row.cells if item is not None]
            starts_here = row_no == 0
            blocks = heading(section, False) if starts_here else []
            if page.items and (
                used + height(blocks) + geo.row_height > max_height
                or len(page.items) + len(members) > max_per_page
            ):
                pages.append(_Page())
                page = pages[-1]
                used = geo.header_height + MARGIN
                if not starts_here:
                    blocks = heading(section, True)
            page.blocks += blocks + [("row", row)]
            page.items += members
            used += height(blocks) + geo.row_height
    return pages


_SHEET_NAME = re.compile(r"^sheet-(\d+)\.jpg$")


def sheet_name(number: int) -> str:
    """`sheet-01.jpg`, ..., `sheet-99.jpg`, `sheet-100.jpg`."""
    return f"sheet-{number:02d}.jpg"


def list_sheets(out_dir: Path) -> list[Path]:
    """The sheet pages in `out_dir`, in page order; [] if the folder does not exist."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    pages = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _SHEET_NAME.match(p.name))]
    return [p for _, p in sorted(pages)]


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
) -> list[Path]:
    """Write contact-sheet pages `sheet-01.jpg`, ... into `out_dir` and return their paths.

    Each page is written atomically; sheets numbered past the last page (from an earlier,
    larger run) are removed. `by` starts a section per value of that axis; `x`/`y` lay out a
    labelled grid, with the other varying axes making separate grids. A missing or unreadable
    thumbnail is drawn as a grey "no thumbnail" box. Raises InputError for an unknown axis
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
        _check_axis(option, name, known)
    if x is not None and x == y:
        raise InputError(f"sheet: --x and --y are both {x!r}; pick two different axes")
    for option, name in (("x", x), ("y", y)):
        if by is not None and name == by:
            raise InputError(f"sheet: --by and --{option} are both {by!r}; pick different axes")
    if max_per_page < 1:
        raise InputError(f"sheet: max images per page must be at least 1, got {max_per_page}")
    if max_megapixels <= 0:
        raise InputError(f"sheet: max megapixels per page must be positive, got {max_megapixels}")

    # 2. Captions name the varying axes not already shown by a band or grid label.
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
    legend = _legend(items, varying, layout)
    legend_count = len(legend)
    probe = _Geometry(1, ROW_LABEL_WIDTH if grid else 0, caption_lines, legend_count)
    if grid:
        want = max(len(s.columns or []) for s in _grid_sections(items, x, y, by, others, 10**9)) if items else 1
    else:
        # About square for a full page; no wider than the largest section.
        largest = max((len(g) for g in _group(items, [by]).values()), default=1) if by else max(len(items), 1)
        target = min(max_per_page, max(len(items), 1))
        want = round(math.sqrt(target * probe.row_height / (THUMB_SIZE + GAP)))
        want = min(max(want, 1), target, largest)
    columns = max(1, min(want, max_per_page))

    def fits(geo: _Geometry) -> bool:
        smallest_page = geo.header_height + geo.band_height + geo.columns_height * grid + geo.row_height + MARGIN
        return geo.width <= MAX_SIDE and geo.width * smallest_page <= max_pixels

    geo = _Geometry(columns, probe.label_width, caption_lines, legend_count)
    while columns > 1 and not fits(geo):
        columns -= 1
        geo = _Geometry(columns, probe.label_width, caption_lines, legend_count)
    if not fits(geo):
        need = geo.width * (geo.header_height + geo.band_height + geo.columns_height + geo.row_height + MARGIN)
        raise InputError(
            f"sheet: max megapixels per page {max_megapixels:g} is too small; one row needs {need / 1e6:.2f}"
        )
    max_height = min(MAX_SIDE, int(max_pixels // geo.width))

    # 4. Lay out sections and flow them onto pages.
    if grid:
        sections = _grid_sections(items, x, y, by, others, columns)
        label_lines = max(
            (len(_wrap(label, LABEL_FONT, THUMB_SIZE, LABEL_LINES)) for s in sections for label in s.columns or []),
            default=1,
        )
        geo = _Geometry(columns, geo.label_width, caption_lines, legend_count, label_lines)
    else:
        sections = _plain_sections(items, by, columns)
    pages = _paginate(sections, geo, max_height, max_per_page) if items else []

    # 5. Draw and write each page, then drop stale pages from an earlier run.
    paths: list[Path] = []
    for number, plan in enumerate(pages, start=1):
        image = _render_page(plan, number, len(pages), title, legend, geo, captions)
        path = out_dir / sheet_name(number)
        write_atomic(path, lambda handle, im=image: im.save(handle, format="JPEG", quality=JPEG_QUALITY))
        paths.append(path)
    for old in list_sheets(out_dir):
        if int(_SHEET_NAME.match(old.name).group(1)) > len(pages):  # type: ignore[union-attr]
            old.unlink(missing_ok=True)
    return paths


def write_index_html(items: Sequence[SheetItem], out_dir: Path, *, title: str) -> Path:
    """Write `out_dir/index.html`, the self-contained page to browse, filter and pick; return its path.

    Raises OSError if the folder cannot be written.
    """
    from imagegen.sheet_html import write_index_html as write

    return write(items, out_dir, title=title)
