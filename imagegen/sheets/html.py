"""The HTML index of a run: `sheets/index.html`, one self-contained page to browse and pick.

No network, no CDN: CSS and JS are inline, links are relative (`../thumbs/...`,
`../images/...`), so the page works from `file://` and from any static server. The page
filters by axis value, opens the full image on click, toggles picks, and exports the pick
list in the picks.txt format (copy to clipboard, or download as `picks.txt`).
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from imagegen.fsutil import write_bytes_atomic
from imagegen.picks import page_header
from imagegen.sheets.items import MISSING, SheetItem, axis_values, caption_axes, caption_for, list_sheets, varying_axes

INDEX_NAME = "index.html"
TEMPLATE = "sheet_index.html"  # under imagegen/templates/


def _href(target: Path, base: Path) -> str:
    """A URL for `target` relative to the folder `base`, percent-encoded."""
    try:
        relative = os.path.relpath(Path(target).absolute(), Path(base).absolute())
    except ValueError:  # another drive on Windows: no relative path exists
        return Path(target).absolute().as_uri()
    return quote(Path(relative).as_posix(), safe="/")


def _script_json(value: object) -> str:
    """JSON that is safe inside a <script> element (no `</script>`, no `<!--`)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _card(item: SheetItem, caption: str, base: Path) -> str:
    e = html.escape
    return (
        f'<figure class="card" data-index="{item.index}" id="job-{item.index}" title="{e(item.job_id)}">'
        f'<a class="full" href="{e(_href(item.image, base))}" target="_blank" rel="noopener">'
        f'<img src="{e(_href(item.thumb, base))}" alt="job {item.index}" loading="lazy" decoding="async"></a>'
        f'<figcaption><span class="idx">{item.index}</span><span class="cap">{e(caption)}</span>'
        f'<button type="button" class="pick" aria-pressed="false">pick</button></figcaption></figure>'
    )


def _photo_heading(name: str, thumb: Path, base: Path) -> str:
    """A full-width heading before the renders of one input photo: its thumbnail (the run
    folder's copy, never the photo itself) and its name."""
    e = html.escape
    return (f'<figure class="photo" data-input="{e(name)}"><img src="{e(_href(thumb, base))}" alt="input photo {e(name)}">'
            f'<figcaption>input photo <b>{e(name)}</b></figcaption></figure>')


def render_index_html(items: Sequence[SheetItem], out_dir: Path, *, title: str, pages: Sequence[Path] | None = None,
                      inputs: Mapping[str, Path] | None = None) -> str:
    """The text of index.html for `items`, with links relative to `out_dir`, and links to the
    sheet `pages` (default: those on disk now). With `inputs` (each value of the `input` axis ->
    its thumbnail), the renders of each input photo follow a heading that shows it."""
    from imagegen.sheets.layout import INPUT_AXIS

    items = sorted(items, key=lambda item: item.index)
    if inputs:
        order = {name: k for k, name in enumerate(dict.fromkeys(item.axes.get(INPUT_AXIS, MISSING) for item in items))}
        items = sorted(items, key=lambda item: (order[item.axes.get(INPUT_AXIS, MISSING)], item.index))
    values = axis_values(items)
    varying = varying_axes(items)
    one_line_title = " ".join(title.split())

    # 1. Summary: how many images, which axes vary, what is the same for all.
    summary = [f"{len(items)} images"]
    if varying:
        summary.append("varying: " + ", ".join(f"{name} ({len(values[name])})" for name in varying))
    fixed = [f"{name} {vals[0]}" for name, vals in values.items() if len(vals) == 1]
    if fixed:
        summary.append("same for all: " + ", ".join(fixed))

    # 2. Data for the script: axis values, each card's value numbers, the initial picks.
    position = {name: {value: k for k, value in enumerate(values[name])} for name in varying}
    data = {
        "axes": [{"name": name, "values": values[name]} for name in varying],
        "items": [[position[name][item.axes.get(name, MISSING)] for name in varying] for item in items],
        "picked": [item.index for item in items if item.picked],
        "header": [f"imagegen picks: {one_line_title}", page_header(item.index for item in items if item.picked)],
    }

    # 3. Fill the template in one pass, so that no inserted text is read as a placeholder.
    sheet_links = " ".join(
        f'<a href="{html.escape(quote(page.name))}">{number}</a>'
        for number, page in enumerate(list_sheets(out_dir) if pages is None else pages, start=1)
    )
    on_caption = caption_axes(items)
    parts, current = [], None
    for item in items:
        name = item.axes.get(INPUT_AXIS) if inputs else None
        if name is not None and name != current and name in inputs:
            parts.append(_photo_heading(name, inputs[name], Path(out_dir)))
        current = name
        parts.append(_card(item, caption_for(item, on_caption), Path(out_dir)))
    cards = "\n".join(parts)
    fills = {
        "TITLE": html.escape(one_line_title),
        "SUMMARY": html.escape(" · ".join(summary)) + (f" · sheets: {sheet_links}" if sheet_links else ""),
        "CARDS": cards,
        "EMPTY": "" if items else '<p id="empty">No images yet.</p>',
        "DATA": _script_json(data),
    }
    template = resources.files("imagegen").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    return re.sub(r"@@([A-Z]+)@@", lambda m: fills[m.group(1)], template)


def write_index_html(items: Sequence[SheetItem], out_dir: Path, *, title: str, pages: Sequence[Path] | None = None,
                     inputs: Mapping[str, Path] | None = None) -> Path:
    """Write `out_dir/index.html` atomically and return its path.

    Raises OSError if the folder cannot be written.
    """
    out_dir = Path(out_dir)
    path = out_dir / INDEX_NAME
    write_bytes_atomic(path, render_index_html(items, out_dir, title=title, pages=pages, inputs=inputs).encode("utf-8"))
    return path
