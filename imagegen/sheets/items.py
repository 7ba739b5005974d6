"""What a contact sheet shows: one `SheetItem` per rendered job, its axes and captions, and the
names of the sheet files. Pure: no Pillow, no disk writes."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen.errors import InputError

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
    joules: float | None = None  # measured energy of the image; None = not measured


def energy_note(items: Sequence[Any]) -> str | None:
    """What the items' measured energy adds up to, for a page header: "1.23 Wh", with "(n of m
    images measured)" when only some were; None when none was measured (never a guess)."""
    measured = [it.joules for it in items if getattr(it, "joules", None) is not None]
    if not measured:
        return None
    wh = sum(measured) / 3600.0
    text = f"{wh:.3g} Wh" if wh >= 0.01 else f"{wh * 1000:.3g} mWh"
    return text if len(measured) == len(items) else f"{text} ({len(measured)} of {len(items)} images measured)"


# --- axes -------------------------------------------------------------------------------


def _axes(item: Any) -> Mapping[str, str]:
    axes = item.axes
    return axes if isinstance(axes, Mapping) else dict(axes)


def axis_values(items: Sequence[Any]) -> dict[str, list[str]]:
    """Every axis name -> its distinct value labels, both in order of first appearance (by index).

    `items` are anything with `.index` and `.axes` (a mapping or (name, label) pairs):
    `SheetItem`s, or the planned `Job`s."""
    values: dict[str, dict[str, None]] = {}
    for item in items:
        for name in _axes(item):
            values.setdefault(name, {})
    for item in sorted(items, key=lambda it: it.index):
        axes = _axes(item)
        for name, seen in values.items():
            seen.setdefault(axes.get(name, MISSING), None)
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


def check_axis(option: str, name: str | None, known: Sequence[str]) -> None:
    """Raise InputError naming the option if `name` is not one of the run's axes."""
    if name is None or name in known:
        return
    hint = difflib.get_close_matches(name, known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    listed = ", ".join(known) if known else "none: every job has the same settings"
    raise InputError(f"sheet --{option}: unknown axis {name!r}{suggestion}; axes in this run: {listed}")


# --- sheet files ------------------------------------------------------------------------

SHEET_NAME = re.compile(r"^sheet-(\d+)\.jpg$")


def sheet_name(number: int) -> str:
    """`sheet-01.jpg`, ..., `sheet-99.jpg`, `sheet-100.jpg`."""
    return f"sheet-{number:02d}.jpg"


def list_sheets(out_dir: Path) -> list[Path]:
    """The sheet pages in `out_dir`, in page order; [] if the folder does not exist."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    pages = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := SHEET_NAME.match(p.name))]
    return [p for _, p in sorted(pages)]

