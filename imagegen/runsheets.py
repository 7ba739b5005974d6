"""Glue between a run folder and the contact sheets / pick list: builds `SheetItem`s from
the manifest and keeps picks.txt and the manifest's mirror of it in step. No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from imagegen.errors import InputError
from imagegen.picks import parse_pick_args, read_pick_notes, read_picks, write_picks
from imagegen.sheet import SheetItem, write_index_html, write_sheets
from imagegen.store import RunStore, image_name, thumb_name

PICKS_HEADER = "imagegen picks: one job index per line (ranges like 12-15 and # comments allowed)"


def sheet_items(store: RunStore, picks: Sequence[int] | None = None) -> list[SheetItem]:
    """One item per finished, planned job, in index order."""
    picked = set(read_picks(store.picks_file) if picks is None else picks)
    items = []
    for row in store.rows(status="done"):
        axes = dict(row.job.get("axes") or {})
        items.append(SheetItem(
            index=row.index, job_id=row.id,
            thumb=store.folder / (row.thumb or f"thumbs/{thumb_name(row.index, row.id)}"),
            image=store.folder / (row.file or f"images/{image_name(row.index, row.id)}"),
            axes=axes, picked=row.index in picked,
        ))
    return items


def write_run_sheets(store: RunStore, *, by: str | None = None, x: str | None = None, y: str | None = None,
                     max_per_page: int = 100) -> tuple[list[Path], Path]:
    """Write sheets/sheet-NN.jpg and sheets/index.html for a run; returns (pages, index).

    Raises InputError for an unknown axis name."""
    items = sheet_items(store)
    title = store.get_meta("recipe_name") or store.folder.name
    pages = write_sheets(items, store.sheets, title=title, by=by, x=x, y=y, max_per_page=max_per_page)
    index = write_index_html(items, store.sheets, title=title)
    return pages, index


def job_indices(store: RunStore) -> tuple[set[int], dict[str, int]]:
    """Valid pick targets: planned job indices, and job ids mapped to their index."""
    rows = store.rows()
    return {r.index for r in rows}, {r.id: r.index for r in rows}


def update_picks(store: RunStore, args: Sequence[str] = (), *, from_file: Path | None = None, remove: bool = False,
                 clear: bool = False) -> list[int]:
    """Change the picks, write picks.txt atomically and mirror it into the manifest.

    `args` are added (or removed with `remove`); `from_file` (a list exported from index.html)
    *replaces* the picks, since it holds the whole set chosen in the browser; `clear` empties
    first. Raises InputError (nothing written) for an index or id that is not in the run, or a
    `from_file` that is not a readable file."""
    valid, ids = job_indices(store)
    chosen = parse_pick_args(list(args), valid, ids=ids) if args else []
    if from_file is not None:
        if not Path(from_file).is_file():
            raise InputError(f"pick --from: {from_file} is not a file")
        extra = read_picks(from_file, ids=ids)
        bad = sorted(set(extra) - valid)
        if bad:
            parse_pick_args([str(bad[0])], valid)  # raises the standard message
        chosen = sorted(set(chosen) | set(extra))
    current = set() if clear or from_file is not None else set(read_picks(store.picks_file, ids=ids))
    new = current - set(chosen) if remove else current | set(chosen)
    notes = {**read_pick_notes(store.picks_file), **(read_pick_notes(from_file) if from_file is not None else {})}
    write_picks(store.picks_file, sorted(new), header=PICKS_HEADER, notes=notes)
    store.set_picks(sorted(new))
    return sorted(new)


def list_picks(store: RunStore) -> list[tuple[int, str, Path | None]]:
    """(index, job id, image path or None when not rendered yet) for each pick."""
    rows = {r.index: r for r in store.rows()}
    out = []
    for i in read_picks(store.picks_file):
        row = rows.get(i)
        if row is None:
            out.append((i, "?", None))
        else:
            out.append((i, row.id, store.folder / row.file if row.status == "done" and row.file else None))
    return out


def remap_picks(store: RunStore, old_ids: dict[int, str]) -> tuple[int, list[str]]:
    """After a recipe edit moved job indices: make picks.txt name the same jobs again.

    `old_ids` maps the indices picks.txt was written against to job ids. Picks of jobs no
    longer in the recipe are dropped from the list and kept as comments. Returns (picks moved,
    orphaned picks). A picks.txt with errors is left alone (the next `pick` reports them)."""
    try:
        picks = read_picks(store.picks_file)
    except InputError:
        return 0, []
    if not picks:
        return 0, []
    new_index = {r.id: r.index for r in store.rows()}
    kept: list[int] = []
    orphaned: list[str] = []
    for i in picks:
        job_id = old_ids.get(i)
        if job_id is None:
            kept.append(i)
        elif job_id in new_index:
            kept.append(new_index[job_id])
        else:
            orphaned.append(f"{i} (job {job_id})")
    moved = sum(1 for i in picks if old_ids.get(i) in new_index and new_index[old_ids[i]] != i)
    if moved or orphaned:
        dropped = [f"dropped pick {o}: no longer in the recipe" for o in orphaned]
        notes = {new_index[old_ids[i]] if old_ids.get(i) in new_index else i: note
                 for i, note in read_pick_notes(store.picks_file).items()}
        write_picks(store.picks_file, kept, header="\n".join([PICKS_HEADER, *dropped]), notes=notes)
        store.set_picks(sorted(set(kept)))
    return moved, orphaned
