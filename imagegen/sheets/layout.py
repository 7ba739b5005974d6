"""Where things go on a contact-sheet page: sections per `by` value or X/Y grids, page
geometry and pagination. Pure arithmetic on `SheetItem`s: no Pillow."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagegen.sheets.items import MISSING, SheetItem, axis_values
from imagegen.thumbs import THUMB_SIZE

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

# --- layout -----------------------------------------------------------------------------


INPUT_AXIS = "input"  # the axis of a job's input photo (plan.py): a section per photo, its thumbnail beside
INPUT_CAPTION = "input photo"


@dataclass
class Row:
    label: str | None  # X/Y row label at the left
    cells: list[SheetItem | None]  # None: an empty grid cell
    input: tuple[Path, str] | None = None  # the section's input photo (thumbnail, name), drawn left of this row


@dataclass
class Section:
    label: str | None  # band text; None: no band
    columns: list[str] | None  # X/Y column labels; None: plain cells
    rows: list[Row]
    input: tuple[Path, str] | None = None  # the input photo of every job in the section


@dataclass
class Page:
    blocks: list[tuple[str, object]] = field(default_factory=list)  # ("band", str) ("columns", list) ("row", Row)
    items: list[SheetItem] = field(default_factory=list)


def chunks(seq: Sequence, size: int) -> list[Sequence]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def combo_label(item: SheetItem, axes: Sequence[str]) -> str:
    return " · ".join(f"{name} {item.axes.get(name, MISSING)}" for name in axes)


def group(items: Sequence[SheetItem], axes: Sequence[str]) -> dict[tuple[str, ...], list[SheetItem]]:
    """Items grouped by their values on `axes`, groups in order of first appearance."""
    groups: dict[tuple[str, ...], list[SheetItem]] = {}
    for item in items:
        groups.setdefault(tuple(item.axes.get(a, MISSING) for a in axes), []).append(item)
    return groups


def section_input(axes: Sequence[str], key: Sequence[str], inputs: Mapping[str, Path] | None) -> tuple[Path, str] | None:
    """(thumbnail, name) of the input photo a section's group key names, when it names one."""
    if not inputs or INPUT_AXIS not in axes:
        return None
    name = key[list(axes).index(INPUT_AXIS)]
    return (inputs[name], name) if name in inputs else None


def plain_sections(items: Sequence[SheetItem], by: str | None, columns: int,
                   inputs: Mapping[str, Path] | None = None) -> list[Section]:
    if by is None:
        return [Section(None, None, [Row(None, list(c)) for c in chunks(items, columns)])]
    return [
        Section(f"{by} = {key[0]}", None, [Row(None, list(c)) for c in chunks(members, columns)],
                section_input([by], key, inputs))
        for key, members in group(items, [by]).items()
    ]


def grid_sections(
    items: Sequence[SheetItem],
    x: str | None,
    y: str | None,
    by: str | None,
    others: Sequence[str],
    max_columns: int,
    inputs: Mapping[str, Path] | None = None,
) -> list[Section]:
    """X/Y grids: one per combination of the group axes, split into column chunks if wide.

    With both `x` and `y`, every other varying axis (and `by`) makes separate grids. With
    only one of them, the other direction holds the combinations of the remaining axes.
    """
    group_axes = ([by] if by else []) + (list(others) if x and y else [])
    rest = [] if x and y else list(others)

    def col_key(item: SheetItem) -> str:
        return f"{x} = {item.axes.get(x, MISSING)}" if x else combo_label(item, rest)

    def row_key(item: SheetItem) -> str:
        return f"{y} = {item.axes.get(y, MISSING)}" if y else combo_label(item, rest)

    sections: list[Section] = []
    for key, members in group(items, group_axes).items():
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
            for chunk_no, cols in enumerate(chunks(col_values, chunk), start=1):
                rows = [
                    Row(row_value, [layer.get((col, row_value)) for col in cols])
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
                sections.append(Section(" · ".join(parts) or None, list(cols), rows, section_input(group_axes, key, inputs)))
    return sections


def line_height(size: int) -> int:
    return round(size * 1.25)


@dataclass(frozen=True)
class Geometry:
    columns: int
    label_width: int  # X/Y row labels; 0 without
    caption_lines: int
    header_lines: int  # summary + legend lines under the title
    label_lines: int = LABEL_LINES  # lines of the tallest X/Y column label
    input_width: int = 0  # the input photos' column at the left (THUMB_SIZE + GAP); 0 without

    @property
    def cell_width(self) -> int:
        return THUMB_SIZE

    @property
    def cell_height(self) -> int:
        captions = self.caption_lines * line_height(CAPTION_FONT)
        return THUMB_SIZE + 4 + line_height(INDEX_FONT) + captions

    @property
    def width(self) -> int:
        cells = self.columns * THUMB_SIZE + (self.columns - 1) * GAP
        return 2 * MARGIN + self.input_width + self.label_width + cells

    @property
    def header_height(self) -> int:
        return MARGIN + line_height(TITLE_FONT) + self.header_lines * line_height(TEXT_FONT) + 16

    @property
    def band_height(self) -> int:
        return line_height(BAND_FONT) + 14

    @property
    def columns_height(self) -> int:
        return self.label_lines * line_height(LABEL_FONT) + 6

    @property
    def row_height(self) -> int:
        return self.cell_height + GAP


def legend_lines(items: Sequence[SheetItem], varying: Sequence[str], layout: str) -> list[str]:
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


def paginate(
    sections: Sequence[Section], geo: Geometry, max_height: int, max_per_page: int
) -> list[Page]:
    """Flow sections onto pages; a section cut by a page break repeats its band and labels."""
    pages = [Page()]
    used = geo.header_height + MARGIN

    def heading(section: Section, continued: bool) -> list[tuple[str, object]]:
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
                pages.append(Page())
                page = pages[-1]
                used = geo.header_height + MARGIN
                if not starts_here:
                    blocks = heading(section, True)
            if blocks and section.input is not None:  # the photo beside the first row of the section on each page
                row = Row(row.label, row.cells, section.input)
            page.blocks += blocks + [("row", row)]
            page.items += members
            used += height(blocks) + geo.row_height
    return pages
