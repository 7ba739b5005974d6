"""A run folder's sheets: `SheetItem`s from the manifest, then the pages and index.html. No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from imagegen.fsutil import remove_temp_files
from imagegen.picks import read_picks
from imagegen.sheets.drawing import drop_stale_sheets, write_sheets
from imagegen.sheets.html import write_index_html
from imagegen.sheets.items import SheetItem
from imagegen.store import RunStore, image_name, thumb_name


def input_thumbs(store: RunStore) -> dict[str, Path]:
    """Each value of the `input` axis (a job's input photo) -> its thumbnail under
    `thumbs/inputs/` (the only copy of a photo's pixels a run keeps)."""
    from imagegen.inputs import thumbnail_path

    out: dict[str, Path] = {}
    for row in store.rows():
        job_input = row.job.get("input") or {}
        label = (row.job.get("axes") or {}).get("input")
        if label and job_input.get("photo_sha256") and label not in out:
            out[label] = thumbnail_path(store.thumbs, job_input["photo_sha256"])
    return out


def sheet_items(store: RunStore, picks: Sequence[int] | None = None) -> list[SheetItem]:
    """One item per finished, planned job, in index order. Raises InputError for a picks.txt
    with errors (when `picks` is not given)."""
    picked = set(read_picks(store.picks_file) if picks is None else picks)
    items = []
    for row in store.rows(status="done"):
        axes = dict(row.job.get("axes") or {})
        items.append(SheetItem(
            index=row.index, job_id=row.id,
            thumb=store.folder / (row.thumb or f"thumbs/{thumb_name(row.index, row.id)}"),
            image=store.folder / (row.file or f"images/{image_name(row.index, row.id)}"),
            axes=axes, picked=row.index in picked, joules=row.joules,
        ))
    return items


def write_run_sheets(store: RunStore, *, by: str | None = None, x: str | None = None, y: str | None = None,
                     max_per_page: int = 100) -> tuple[list[Path], Path]:
    """Write sheets/sheet-NN.jpg and sheets/index.html for a run; returns (pages, index).

    Raises InputError for an unknown axis name."""
    items = sheet_items(store)
    title = store.get_meta("recipe_name") or store.folder.name
    remove_temp_files(store.sheets)  # what a killed `sheet` left (of no live process)
    photos = input_thumbs(store)
    pages = write_sheets(items, store.sheets, title=title, by=by, x=x, y=y, max_per_page=max_per_page, drop_stale=False,
                         inputs=photos)
    # index.html names exactly the new pages, and is written before stale pages go: a kill at
    # any point leaves an index whose every link is on disk.
    index = write_index_html(items, store.sheets, title=title, pages=pages, inputs=photos)
    drop_stale_sheets(store.sheets, len(pages))
    return pages, index


def write_run_index(store: RunStore, picks: Sequence[int] | None = None) -> Path:
    """Rewrite only sheets/index.html (after `pick`: a page opened later shows the current picks)."""
    title = store.get_meta("recipe_name") or store.folder.name
    return write_index_html(sheet_items(store, picks), store.sheets, title=title, inputs=input_thumbs(store))
