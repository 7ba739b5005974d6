"""The server's GPU queue: recipes submitted by the team, rendered one at a time by a worker
thread in the server process, recorded in the server's own SQLite file
(`DIR/.imagegen-serve/queue.sqlite`) so that a restart resumes.

A recipe renders through the render flow (`render_recipe`, then the sheets) into its run
folder, which must lie inside DIR (a recipe without `output:` renders into DIR/<name>). The
worker holds the device lock (`imagegen.devicelock`) while a model is loaded and keeps that
model between recipes with the same checkpoint, VAE, device and dtype; when the queue is empty
it lets the model and the lock go, so a plain `imagegen render` can use the GPU. Starlette-free.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.errors import ImagegenError, InputError

STATES = ("queued", "running", "done", "failed", "cancelled")
SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    recipe_text TEXT NOT NULL,
    base_dir TEXT NOT NULL,
    source TEXT,
    output TEXT NOT NULL,
    who TEXT,
    submitted_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    started_at REAL,
    finished_at REAL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,
    message TEXT
)
"""
IDLE_POLL = 1.0  # seconds between looks at an empty queue


def parse_recipe(text: str, base_dir: Path, source: str | None = None) -> Any:
    """A validated Recipe from submitted YAML text; relative paths resolve against `base_dir`.
    Raises RecipeError / InputError."""
    import yaml

    from imagegen.api import load_recipe

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{source or 'recipe'}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source or 'recipe'}: a recipe is a YAML mapping of keys")
    return load_recipe(data, base_dir=base_dir), data


@dataclass
class Entry:
    id: int
    name: str
    output: str
    who: str | None
    submitted_at: float
    status: str
    started_at: float | None
    finished_at: float | None
    done: int
    total: int
    message: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Queue:
    """The queue file of the server for DIR `root`, and its worker."""

    def __init__(self, root: Path, path: Path, *, device: str | None = None,
                 render: Callable[..., Any] | None = None) -> None:
        self.root = Path(root).resolve()
        self.path = path
        self.device = device
        self._render = render or _render_entry
        self._lock = threading.Lock()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(SCHEMA)
        # A server killed mid-recipe: that recipe runs again (the run folder resumes where it stopped).
        self._conn.execute("UPDATE queue SET status = 'queued' WHERE status = 'running'")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.engine_cache = EngineCache()

    # --- the table -----------------------------------------------------------------------------

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, args)

    def submit(self, text: str, *, base_dir: str, source: str | None = None, who: str | None = None) -> Entry:
        """Validate the recipe now (every problem reported at once) and queue it; returns its entry.
        Raises RecipeError, or InputError for an output folder outside DIR."""
        base = Path(base_dir)
        if not base.is_absolute():
            raise InputError(f"base_dir {base_dir!r} must be an absolute path")
        recipe, data = parse_recipe(text, base, source)
        output = recipe.output.resolve() if data.get("output") else self.root / recipe.name
        if output != self.root and self.root not in output.parents:
            raise InputError(f"{source or recipe.name}: output {output} is outside {self.root}, which this server "
                             "serves; drop `output:` (renders into DIR/<name>) or point it inside")
        cur = self._exec("INSERT INTO queue (name, recipe_text, base_dir, source, output, who, submitted_at, total) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (recipe.name, text, str(base), source, str(output), who, time.time(), 0))
        return self.get(int(cur.lastrowid))

    def get(self, entry_id: int) -> Entry:
        row = self._exec("SELECT * FROM queue WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            raise InputError(f"queue: no entry {entry_id}")
        return _entry(row)

    def entries(self, *, limit: int = 200) -> list[Entry]:
        rows = self._exec("SELECT * FROM (SELECT * FROM queue ORDER BY id DESC LIMIT ?) ORDER BY id", (limit,))
        return [_entry(r) for r in rows.fetchall()]

    def cancel(self, entry_id: int) -> Entry:
        """A queued entry is cancelled at once; a running one stops after its current batch."""
        entry = self.get(entry_id)
        if entry.status == "queued":
            self._exec("UPDATE queue SET status = 'cancelled', finished_at = ? WHERE id = ? AND status = 'queued'",
                       (time.time(), entry_id))
        elif entry.status == "running":
            self._exec("UPDATE queue SET cancel = 1 WHERE id = ?", (entry_id,))
        else:
            raise InputError(f"queue: entry {entry_id} is already {entry.status}")
        return self.get(entry_id)

    def _claim(self) -> sqlite3.Row | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM queue WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is not None:
                self._conn.execute("UPDATE queue SET status = 'running', started_at = ?, cancel = 0 WHERE id = ?",
                                   (time.time(), row["id"]))
            return row

    def _cancelled(self, entry_id: int) -> bool:
        return bool(self._exec("SELECT cancel FROM queue WHERE id = ?", (entry_id,)).fetchone()[0])

    # --- the worker ----------------------------------------------------------------------------

    def run_next(self) -> Entry | None:
        """Render the oldest queued recipe (None when there is none)."""
        row = self._claim()
        if row is None:
            return None
        entry_id = row["id"]

        def progress(done: int, total: int) -> None:
            self._exec("UPDATE queue SET done = ?, total = ? WHERE id = ?", (done, total, entry_id))

        def should_stop() -> str | None:
            return "cancelled" if self._cancelled(entry_id) or self._stop.is_set() else None

        try:
            summary = self._render(self, row, progress, should_stop)
        except ImagegenError as exc:
            status, message = "failed", exc.message
        except Exception as exc:  # a worker must outlive one bad recipe; the reason is kept
            status, message = "failed", f"{type(exc).__name__}: {exc}"
        else:
            if summary.interrupted and self._stop.is_set() and not self._cancelled(entry_id):
                self._exec("UPDATE queue SET status = 'queued' WHERE id = ?", (entry_id,))  # resumes on restart
                return self.get(entry_id)
            status = "cancelled" if summary.interrupted else ("failed" if summary.failed else "done")
            message = f"{summary.rendered} rendered, {summary.failed} failed, {summary.left} left"
        self._exec("UPDATE queue SET status = ?, finished_at = ?, message = ? WHERE id = ?",
                   (status, time.time(), message, entry_id))
        return self.get(entry_id)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="imagegen-queue", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.run_next() is None:
                self.engine_cache.release()  # idle: free the GPU for plain renders
                self._stop.wait(IDLE_POLL)
        self.engine_cache.release()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the current batch (the running recipe goes back to queued) and join."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            self._conn.close()


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(row["id"], row["name"], row["output"], row["who"], row["submitted_at"], row["status"],
                 row["started_at"], row["finished_at"], row["done"], row["total"], row["message"])


class EngineCache:
    """The last loaded model, kept between recipes with the same checkpoint, VAE, device and
    dtype, with the device lock held as long as it stays loaded."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.engine: Any = None
        self.loads = 0  # models loaded so far (tests read it)
        self._hold = contextlib.ExitStack()

    def open(self, checkpoint: Any, *, family: Any = None, vae: Any = None, device: str | None = None,
             dtype: str | None = None, allow_download: bool = False, **extra: Any) -> Any:
        from imagegen.devicelock import device_lock
        from imagegen.devices import resolve_device
        from imagegen.engine import open_engine

        resolved = resolve_device(device)
        key = (str(checkpoint), str(family), str(vae), resolved, dtype, tuple(sorted(extra.items())))
        if key != self.key:
            self.release()
            self._hold.enter_context(device_lock(resolved, wait=True, holder="imagegen serve queue"))
            self.engine = open_engine(checkpoint, family=family, vae=vae, device=resolved, dtype=dtype,
                                      allow_download=allow_download, **extra)
            self.key = key
            self.loads += 1
        return self.engine

    def release(self) -> None:
        if self.engine is not None or self.key is not None:
            self.engine, self.key = None, None
            import gc

            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass
        self._hold.close()
        self._hold = contextlib.ExitStack()


def _render_entry(queue: Queue, row: sqlite3.Row, progress: Callable[[int, int], None],
                  should_stop: Callable[[], str | None]) -> Any:
    """Render one queued recipe into its run folder, then its sheets (the render flow of
    `imagegen render`, with the queue's engine cache)."""
    from imagegen.render import RenderOptions, render_recipe
    from imagegen.sheets import write_run_sheets
    from imagegen.store import RunStore

    recipe, _ = parse_recipe(row["recipe_text"], Path(row["base_dir"]), row["source"])
    counts = {"done": 0, "total": 0}

    def events(event: dict) -> None:
        if event.get("event") == "start":
            counts["total"] = int(event.get("to_render") or 0)
            progress(0, counts["total"])
        elif event.get("event") in ("image", "failed"):
            counts["done"] += 1
            progress(counts["done"], counts["total"])

    with RunStore.open(Path(row["output"]), wait=True, recipe_name=recipe.name) as store:
        summary = render_recipe(recipe, store, options=RenderOptions(device=queue.device), on_event=events,
                                should_stop=should_stop, open_engine=queue.engine_cache.open)
        write_run_sheets(store)
    return summary
