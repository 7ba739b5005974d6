"""Run preparation: make the run folder agree with the plan before anything heavy loads.

plan -> freeze the recipe -> sync the manifest -> reconcile files after a crash -> remap picks
-> the pending jobs (with `--limit`) and the start event's figures.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from imagegen.fsutil import remove_temp_files
from imagegen.metadata import read_provenance
from imagegen.picks import remap_picks
from imagegen.plan import Job, plan
from imagegen.recipe import Recipe
from imagegen.render.writer import FIRST_FOLDER
from imagegen.store import RunStore


@dataclass
class PreparedRun:
    """What a render starts from: every planned job, the pending ones, and what preparing did."""

    jobs: list[Job]
    pending: list[Job]
    left: int  # pending jobs held back by `limit`
    start_event: dict


def remake_thumbnail(image_path: Path, thumb_path: Path) -> None:
    """Rebuild a thumbnail a crash left out (the only time a full render is decoded again)."""
    from PIL import Image

    from imagegen.thumbs import make_thumbnail, save_thumbnail_atomic

    with Image.open(image_path) as im:
        save_thumbnail_atomic(make_thumbnail(im.convert("RGB")), thumb_path)


def verify_image(path: Path, job_id: str) -> bool:
    """True when `path` is a complete PNG of ours for `job_id` (used to adopt files after a crash)."""
    prov = read_provenance(path)
    if not prov or prov.get("id") != job_id:
        return False
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def follow_first_passes(folder: Path, index_of: dict[str, int]) -> int:
    """Rename kept hires first passes (`first/`) whose job index moved with a recipe edit, as
    the store renames the final images; returns how many were renamed."""
    import os

    from imagegen.store import IMAGE_NAME, image_name

    renamed = 0
    for p in sorted(folder.glob("*.png")) if folder.is_dir() else ():
        m = IMAGE_NAME.match(p.name)
        if m and m.group(2) in index_of and int(m.group(1)) != index_of[m.group(2)]:
            os.replace(p, folder / image_name(index_of[m.group(2)], m.group(2)))
            renamed += 1
    return renamed


def prepare_run(recipe: Recipe, store: RunStore, *, retry_failed: bool = False, limit: int | None = None,
                verify: bool = False) -> PreparedRun:
    """Plan the recipe and bring the run folder in line with it (recipe copy, manifest, files
    a crash left, picks whose indices moved). Raises DiskFullError when the manifest cannot
    be written."""
    jobs = plan(recipe)
    by_id = {j.id: j for j in jobs}
    store.freeze_recipe(recipe.text, recipe.sha256, recipe.name)
    store.set_meta("upscale", json.dumps(dataclasses.asdict(recipe.upscale)))  # paths already absolute
    old_ids = {r.index: r.id for r in store.rows()}
    sync = store.sync_plan([j.to_dict() for j in jobs])
    rec = store.reconcile(verify=verify_image)
    if verify:  # `render --verify`: every done image against its recorded sha256; damaged ones render again
        damaged = store.verify_files()
        store.requeue([d["id"] for d in damaged])
        rec.damaged += [f"{d['file']}: {d['problem']}" for d in damaged]
        rec.reset_missing += len(damaged)
    rec.temp_removed += remove_temp_files(store.folder / FIRST_FOLDER)
    follow_first_passes(store.folder / FIRST_FOLDER, {j.id: j.index for j in jobs})
    picks_moved, picks_orphaned = remap_picks(store, old_ids)
    for _, image_path, thumb_path in rec.missing_thumbs:
        remake_thumbnail(image_path, thumb_path)
    pending = [by_id[i] for i in store.pending_ids(retry_failed=retry_failed)]
    counts = store.counts()
    left = 0
    if limit is not None:
        left = max(0, len(pending) - limit)
        pending = pending[:limit]
    start = {"event": "start", "recipe": recipe.name, "folder": str(store.folder), "planned": len(jobs), "done": counts["done"],
             "failed": counts["failed"], "to_render": len(pending), "new": sync["new"], "orphaned": sync["orphaned"],
             "adopted": rec.adopted, "temp_removed": rec.temp_removed, "reset_missing": rec.reset_missing,
             "renamed": rec.renamed, "untracked": rec.untracked, "picks_moved": picks_moved, "picks_orphaned": picks_orphaned}
    return PreparedRun(jobs, pending, left, start)
