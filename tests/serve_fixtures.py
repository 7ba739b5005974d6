"""Run folders for the server tests, written straight through the store (no model)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from imagegen.store import RunStore, image_name, thumb_name
from imagegen.thumbs import make_thumbnail, save_thumbnail_atomic


def make_run(folder: Path, n: int = 6, *, name: str = "test run", done: int | None = None) -> Path:
    """A run of n jobs over prompt x seed; the first `done` (default all) finished with images."""
    done = n if done is None else done
    with RunStore.open(folder) as store:
        store.set_meta("recipe_name", name)
        jobs = [{"id": f"{i:012x}", "index": i, "axes": {"prompt": f"#{i % 2} a chair <b>", "seed": str(100 + i % 3)}}
                for i in range(1, n + 1)]
        store.sync_plan(jobs)
        for job in jobs[:done]:
            picture = Image.new("RGB", (64, 64), (job["index"] * 40 % 256, 80, 160))
            image = store.images / image_name(job["index"], job["id"])
            thumb = store.thumbs / thumb_name(job["index"], job["id"])
            picture.save(image)
            save_thumbnail_atomic(make_thumbnail(picture), thumb)
            store.mark_done(job["id"], file=image, sha256="0" * 64, thumb=thumb, seconds=0.5)
    return folder
