"""What the review server reads from DIR: the run folders under it, their progress, gallery
items, picks and upscaled deliveries. Starlette-free; every path a request names is resolved
here, inside DIR only.

Picks change only through `imagegen.picks.update_picks` (the same file, format and lock as
`imagegen pick`); a per-run thread lock keeps concurrent requests of this process in order.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.errors import InputError
from imagegen.store import MANIFEST, RunStore

SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]{0,200}$")  # one folder or file name a URL may name
MAX_DEPTH = 4  # run folders are found this many levels below DIR at most
SKIP_DIRS = {"images", "thumbs", "sheets", "upscaled", "recipe-history", "__pycache__", "node_modules"}
FILE_KINDS = ("images", "thumbs", "upscaled")  # the run subfolders whose files are served
PREVIEW_SIDE = 1600  # long side of the downsized preview of an upscaled delivery
BROWSER_FORMATS = {".png", ".jpg", ".jpeg", ".webp"}  # shown as is when small enough
PREVIEW_ABOVE = 4096  # a delivery whose long side exceeds this is shown through its preview


class NotFound(InputError):
    """A run or file the request names is not there (or not inside DIR)."""


def find_runs(root: Path) -> list[str]:
    """Run folders under `root` (itself included), as '/'-joined names relative to it, sorted.
    Hidden folders and run subfolders are not searched; symlinks are not followed."""
    root = Path(root).resolve()
    found: list[str] = []

    def walk(folder: Path, depth: int, rel: tuple[str, ...]) -> None:
        if (folder / MANIFEST).is_file():
            found.append("/".join(rel) or ".")
        if depth >= MAX_DEPTH:
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if (entry.is_dir(follow_symlinks=False) and SAFE_PART.match(entry.name)
                    and entry.name not in SKIP_DIRS):
                walk(Path(entry.path), depth + 1, (*rel, entry.name))

    walk(root, 0, ())
    return found


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise NotFound("not found")
    return resolved


def resolve_run(root: Path, name: str) -> Path:
    """The run folder `name` ('.' or 'a/b') names under `root`. Raises NotFound for '..',
    odd characters, symlinks leading out of `root`, or a folder that is not a run."""
    root = Path(root).resolve()
    parts = [] if name in (".", "") else name.split("/")
    if len(parts) > MAX_DEPTH or not all(SAFE_PART.match(p) and p not in SKIP_DIRS for p in parts):
        raise NotFound("not found")
    folder = _inside(root, root.joinpath(*parts))
    if not (folder / MANIFEST).is_file():
        raise NotFound("not found")
    return folder


def resolve_file(run: Path, kind: str, name: str) -> Path:
    """A file in the run's images/, thumbs/ or upscaled/ folder; NotFound otherwise."""
    if kind not in FILE_KINDS or not SAFE_PART.match(name):
        raise NotFound("not found")
    path = _inside(run, run / kind / name)
    if path.parent != (run / kind).resolve() or not path.is_file():
        raise NotFound("not found")
    return path


def open_run(folder: Path) -> RunStore:
    """An unlocked store (status, picks): works while a render writes into the folder."""
    return RunStore.open(folder, create=False, lock=False)


def run_summary(root: Path, name: str) -> dict[str, Any]:
    """Progress of one run: the store's status (done, pending, failed, total, rate,
    eta_seconds) plus its name and pick count; an unreadable run reports its error."""
    from imagegen.picks import read_picks

    folder = resolve_run(root, name)
    try:
        with open_run(folder) as store:
            status = store.status()
        picks = len(read_picks(folder / "picks.txt"))
    except InputError as exc:
        return {"name": name, "error": exc.message}
    keep = ("done", "pending", "failed", "total", "rate", "eta_seconds", "recipe")
    energy = status.get("energy") or {}
    return {"name": name, **{k: status.get(k) for k in keep}, "picks": picks,
            "last_error": (status.get("last_error") or {}).get("error"),
            "wh_per_image": energy.get("wh_per_image"), "kwh": energy.get("kwh")}  # None: not measured


@dataclass(frozen=True)
class GalleryItem:
    index: int
    job_id: str
    image: str | None  # file name under images/ (None: not rendered)
    thumb: str | None  # file name under thumbs/
    axes: dict[str, str]


def gallery(folder: Path) -> tuple[str, list[GalleryItem]]:
    """(title, finished jobs in index order) of a run."""
    items = []
    with open_run(folder) as store:
        title = store.get_meta("recipe_name") or folder.name
        for row in store.rows(status="done"):
            image = Path(row.file).name if row.file else None
            thumb = Path(row.thumb).name if row.thumb else None
            if thumb and not (folder / "thumbs" / thumb).is_file():
                thumb = None
            items.append(GalleryItem(row.index, row.id, image, thumb,
                                     {k: str(v) for k, v in (row.job.get("axes") or {}).items()}))
    return title, items


def current_picks(folder: Path) -> dict[str, Any]:
    """{'picks': [indices], 'notes': {index: note}} as picks.txt holds them now (shell edits
    included). A picks.txt with errors reports them in 'error'."""
    from imagegen.picks import read_pick_notes, read_picks

    try:
        picks = read_picks(folder / "picks.txt")
    except InputError as exc:
        return {"picks": [], "notes": {}, "error": exc.message}
    notes = read_pick_notes(folder / "picks.txt")
    return {"picks": picks, "notes": {str(i): notes[i] for i in picks if i in notes}}


_pick_locks: dict[Path, threading.Lock] = {}
_pick_locks_guard = threading.Lock()


def _pick_lock(folder: Path) -> threading.Lock:
    with _pick_locks_guard:
        return _pick_locks.setdefault(folder, threading.Lock())


def set_pick(folder: Path, index: int, picked: bool, note: str | None = None) -> dict[str, Any]:
    """Pick (or unpick) one job of the run and optionally set its note, through
    `imagegen.picks.update_picks`; returns the new `current_picks`. Raises InputError for an
    index not in the run or a picks.txt with errors."""
    from imagegen.picks import update_picks

    with _pick_lock(folder), open_run(folder) as store:
        notes = {index: note} if note is not None and picked else None
        update_picks(store, [str(index)], remove=not picked, notes=notes)
    return current_picks(folder)


@dataclass(frozen=True)
class Delivery:
    name: str
    size: int
    mtime: float
    width: int | None
    height: int | None
    direct: bool  # the browser can show the file itself (small PNG/JPEG)


def _dimensions(path: Path) -> tuple[int | None, int | None]:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
            return int(shape[1]), int(shape[0])
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:  # an unreadable delivery is listed without its size
        return None, None


def deliveries(folder: Path) -> list[Delivery]:
    """The files in the run's upscaled/ folder (temporary files left out), newest first."""
    out = []
    up = folder / "upscaled"
    if not up.is_dir():
        return out
    for path in up.iterdir():
        if not path.is_file() or not SAFE_PART.match(path.name) or ".tmp" in path.name:
            continue
        st = path.stat()
        w, h = _dimensions(path)
        direct = path.suffix.lower() in BROWSER_FORMATS and w is not None and max(w, h or 0) <= PREVIEW_ABOVE
        out.append(Delivery(path.name, st.st_size, st.st_mtime, w, h, direct))
    return sorted(out, key=lambda d: (-d.mtime, d.name))


_preview_lock = threading.Lock()  # one big decode at a time


def preview(path: Path, cache: Path, side: int = PREVIEW_SIDE) -> Path:
    """A JPEG of `path` with long side `side` at most, made once (Pillow; tifffile through a
    disk-backed memory map for big TIFFs) and kept in `cache` by name, size and mtime."""
    st = path.stat()
    where = hashlib.sha256(str(path).encode()).hexdigest()[:12]  # two runs may hold the same file name
    out = cache / f"{path.stem}-{where}-{st.st_size}-{int(st.st_mtime)}-{side}.jpg"
    if out.is_file():
        return out
    from PIL import Image

    from imagegen.fsutil import write_atomic
    from imagegen.thumbs import _to_rgb

    with _preview_lock:
        if out.is_file():
            return out
        image = None
        if path.suffix.lower() in (".tif", ".tiff"):
            import numpy as np
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                h, w = page.shape[:2]
                array = page.asarray(out="memmap")
                step = max(1, max(h, w) // (side * 2))
                small = np.ascontiguousarray(array[::step, ::step])
                del array
            if small.dtype != np.uint8:
                small = (small / (np.iinfo(small.dtype).max / 255)).astype(np.uint8)
            image = Image.fromarray(small)
        else:
            Image.MAX_IMAGE_PIXELS = None  # our own deliveries: 17000 px is expected
            image = Image.open(path)
            image.draft("RGB", (side, side))
        image = _to_rgb(image)
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        cache.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda f: image.save(f, "JPEG", quality=85))
    return out


def iter_chunks(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data
