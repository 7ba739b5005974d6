"""The run folder: its SQLite manifest, atomic files, the lock, reconciliation and picks.

Layout::

    RUN/recipe.yaml         frozen copy of the recipe last rendered (+ recipe.sha256)
    RUN/recipe-history/     earlier versions, by hash
    RUN/manifest.sqlite     jobs, status, file hashes, timings (WAL mode)
    RUN/images/0042-<id>.png
    RUN/thumbs/0042-<id>.jpg
    RUN/sheets/             contact sheets and index.html
    RUN/picks.txt           picked job indices, editable by hand
    RUN/log.jsonl           one event per line

Invariants: a file under images/ is complete or absent (temporary name in the same folder,
fsync, rename); after a crash `reconcile()` makes the manifest and the files agree again,
never deleting a finished image. Knows nothing about diffusers or torch.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from imagegen.defaults import RECIPE_INLINE_BYTES
from imagegen.errors import DiskFullError, ImagegenError, InputError, RunLockedError, disk_full, is_disk_full  # noqa: F401
from imagegen.fsutil import fsync_dir, remove_temp_files, write_bytes_atomic

IMAGE_NAME = re.compile(r"^(\d+)-([0-9a-f]{12})\.png$")
MANIFEST = "manifest.sqlite"
SUBFOLDERS = ("images", "thumbs", "sheets", "upscaled", "recipe-history", "first")  # imagegen writes (and deletes temp files) in these

# Add-only, numbered schema migrations; each runs once, in order, recorded in `_migrations`.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "001_jobs",
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            idx INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
            in_plan INTEGER NOT NULL DEFAULT 1,
            file TEXT,
            sha256 TEXT,
            thumb TEXT,
            seconds REAL,
            finished_at REAL,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            job TEXT NOT NULL
        );
        CREATE INDEX jobs_by_idx ON jobs (in_plan, idx);
        CREATE INDEX jobs_by_status ON jobs (status);
        """,
    ),
    ("002_meta", "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"),
    ("003_picks", "CREATE TABLE picks (idx INTEGER PRIMARY KEY, id TEXT, added_at REAL NOT NULL);"),
    ("004_energy", "ALTER TABLE jobs ADD COLUMN joules REAL;"),  # measured joules per image; NULL = not measured
    (
        "005_claims",  # the queue of a run with several workers (`imagegen.render.workers`)
        """
        CREATE TABLE claims (
            id TEXT PRIMARY KEY,
            idx INTEGER NOT NULL,
            grp TEXT NOT NULL,
            queued_at REAL NOT NULL,
            worker TEXT,
            lease_until REAL
        );
        CREATE INDEX claims_by_worker ON claims (worker);
        CREATE TABLE workers (
            name TEXT PRIMARY KEY,
            pid INTEGER,
            host TEXT,
            device TEXT,
            started_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            rendered INTEGER NOT NULL DEFAULT 0,
            seconds REAL NOT NULL DEFAULT 0,
            state TEXT NOT NULL DEFAULT 'starting'
        );
        """,
    ),
)
# Steps a reader (status, an unlocked open) can do without: a manifest last rendered before
# them is still read; what they add is reported as absent.
READ_OPTIONAL_STEPS = frozenset({"004_energy", "005_claims"})


class _Transaction:
    def __init__(self, conn: sqlite3.Connection, folder: Path) -> None:
        self.conn = conn
        self.folder = folder

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return False
            except sqlite3.OperationalError as commit_exc:
                exc = commit_exc
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and is_disk_full(exc):
            raise disk_full(self.folder / MANIFEST) from None
        if exc_type is None:
            raise exc
        return False


def pending_states(retry_failed: bool) -> tuple[str, ...]:
    """The job states a render takes up: pending, and failed ones with `retry_failed`."""
    return ("pending", "failed") if retry_failed else ("pending",)


@dataclass
class PendingPreview:
    """What a render would do, worked out without touching the run folder (`--dry-run`)."""

    todo: list[str]  # job ids a render would take up, in plan order
    done: set[str]  # planned job ids already done
    failed: set[str]  # planned job ids that failed and stay failed (no retry)


def preview_pending(folder: Path, job_ids: Sequence[str], *, retry_failed: bool = False) -> PendingPreview:
    """The pending logic of `RunStore.pending_ids`, against a plan that is not synced yet: a
    job the manifest does not know is new, hence pending. Reads the manifest if there is one;
    writes nothing, takes no lock. Raises InputError for an unreadable manifest."""
    status: dict[str, str] = {}
    if (Path(folder) / MANIFEST).exists():
        with RunStore.open(folder, create=False, lock=False) as store:
            status = {row.id: row.status for row in store.rows(include_orphans=True)}
    states = pending_states(retry_failed)
    todo = [i for i in job_ids if status.get(i, "pending") in states]
    return PendingPreview(todo, {i for i in job_ids if status.get(i) == "done"},
                          {i for i in job_ids if status.get(i) == "failed" and "failed" not in states})


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def final_size(job: dict) -> tuple[int | None, int | None]:
    """The size of a job's image on disk: its hires pass's size when it has one."""
    hires = job.get("hires") or {}
    return (hires.get("width") or job.get("width"), hires.get("height") or job.get("height"))


def png_problem(path: Path, width: int | None = None, height: int | None = None) -> str | None:
    """Why `path` is not a complete PNG of `width` x `height` (None when it looks complete).

    Cheap and Pillow-free: the signature, the IHDR size (so a PNG that declares 60000x60000
    never reaches Pillow's decompression-bomb check) and the IEND chunk at the very end (a
    truncated or overwritten file fails it). `verify_files` compares full sha256s."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < 24 + len(_PNG_END):
                return f"{size} bytes: too short for a PNG"
            f.seek(size - len(_PNG_END))
            tail = f.read(len(_PNG_END))
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return "not a PNG"
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if (width, height) != (None, None) and (w, h) != (width, height):
        return f"declares {w}x{h}, the job is {width}x{height}"
    if tail != _PNG_END:
        return "truncated (no IEND chunk at the end)"
    return None


def _never_a_run_folder(folder: Path) -> str | None:
    """Why `folder` can never be a run folder (a filesystem root, the home folder itself)."""
    try:
        real = folder.resolve()
    except (OSError, RuntimeError):
        return None
    if real == Path(real.anchor):
        return "is a filesystem root"
    try:
        if real == Path.home().resolve():
            return "is your home folder"
    except (OSError, RuntimeError, KeyError):
        pass
    return None


def _only_our_leftovers(folder: Path) -> bool:
    """True when `folder` holds nothing but what a start that died before its manifest
    leaves: the lock, our temp files, empty sub-folders of ours."""
    from imagegen.fsutil import is_our_temp

    for entry in folder.iterdir():
        if entry.name in (".lock", ".picks.lock") or is_our_temp(entry.name):
            continue
        if entry.name in SUBFOLDERS and entry.is_dir() and not entry.is_symlink() \
                and all(is_our_temp(e.name) for e in entry.iterdir()):
            continue
        return False
    return True


def check_run_folder(folder: Path, *, create: bool) -> None:
    """Refuse (InputError) a folder imagegen must not write into: a filesystem root or the home
    folder, a non-empty folder that is not a run (no manifest: the user's own files), and a run
    whose sub-folders are symlinks (reconcile and the writers would act in the link's target)."""
    folder = Path(folder)
    why = _never_a_run_folder(folder)
    if why:
        raise InputError(f"{folder}: {why}; a run folder must be a folder of its own (e.g. runs/<name>)")
    if create and folder.is_dir() and not (folder / MANIFEST).is_file():
        try:
            ours = _only_our_leftovers(folder)
        except OSError as exc:
            raise InputError(f"{folder}: cannot read the folder: {exc.strerror or exc}") from None
        if not ours:
            raise InputError(f"{folder}: not empty and not an imagegen run folder (no {MANIFEST}); "
                             "imagegen will not write among other files: choose a new or empty `output:` folder")
    for sub in SUBFOLDERS:
        if (folder / sub).is_symlink():
            raise InputError(f"{folder / sub}: is a symlink; imagegen writes and cleans only real folders inside a "
                             f"run folder: replace it with a folder (move the files in) or choose another `output:`")


def recipe_history_name(sha256: str) -> str:
    """Where a run folder keeps the recipe of this sha256 once it is not the current one (and
    at once for a recipe too large to ride in its images): relative to the run folder."""
    return f"recipe-history/{sha256[:12]}.yaml"


def _render_holder(folder: Path) -> str | None:
    """"PID n on host" of the render holding `folder`'s lock now, or None when none does."""
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (ValueError, OSError):
                holder = {}
            return f"PID {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def image_name(index: int, job_id: str) -> str:
    return f"{index:04d}-{job_id}.png"


def thumb_name(index: int, job_id: str) -> str:
    return f"{index:04d}-{job_id}.jpg"


@dataclass
class ReconcileReport:
    temp_removed: int = 0
    adopted: int = 0
    reset_missing: int = 0
    renamed: int = 0
    untracked: list[str] = field(default_factory=list)
    missing_thumbs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (job id, image, thumb to make)
    damaged: list[str] = field(default_factory=list)  # "name: what is wrong" of images put back to pending


@dataclass
class JobRow:
    id: str
    index: int
    status: str
    in_plan: bool
    file: str | None
    sha256: str | None
    thumb: str | None
    seconds: float | None
    finished_at: float | None
    error: str | None
    attempts: int
    job: dict
    joules: float | None = None  # measured energy of the image (004_energy); None = not measured


class RunStore:
    """An open, locked run folder. Use `RunStore.open(...)` and `close()` (or `with`)."""

    def __init__(self, folder: Path, conn: sqlite3.Connection, lock_fd: int | None) -> None:
        self.folder = folder
        self.images = folder / "images"
        self.thumbs = folder / "thumbs"
        self.sheets = folder / "sheets"
        self.picks_file = folder / "picks.txt"
        self.log_file = folder / "log.jsonl"
        self._conn = conn
        self._lock_fd = lock_fd

    # --- opening, locking, schema ------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, *, wait: bool = False, create: bool = True, lock: bool = True,
             recipe_name: str | None = None, adopt: bool = False) -> "RunStore":
        """Open (and by default create and lock) a run folder.

        Only the lock holder (a render) creates or upgrades the manifest; an unlocked open (status,
        sheet, pick) needs an existing, current one. With `recipe_name` (a render), a run that the
        manifest says belongs to another recipe is refused unless `adopt`. Raises RunLockedError
        when another process renders into it (unless `wait`), InputError when the folder cannot be
        created, is not a run folder (or not one of this recipe), or its manifest is unreadable."""
        folder = Path(folder)
        if not create and not (folder / MANIFEST).is_file():
            raise InputError(f"{folder}: not a run folder (no {MANIFEST}); render a recipe into it first")
        check_run_folder(folder, create=create)
        if create:
            try:
                for sub in ("", "images", "thumbs", "sheets"):
                    (folder / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"{folder}: cannot create the run folder: {exc.strerror or exc}") from None
        lock_fd = cls._lock(folder, wait) if lock else None
        try:
            conn = sqlite3.connect(folder / MANIFEST, timeout=30, isolation_level=None, check_same_thread=False)
            try:
                conn.row_factory = sqlite3.Row
                store = cls(folder, conn, lock_fd)
                if lock:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=NORMAL")
                    store._migrate()
                else:
                    store._check_schema()
                owner = store.get_meta("recipe_name") if recipe_name is not None else None
            except sqlite3.DatabaseError as exc:
                conn.close()
                if is_disk_full(exc):
                    raise disk_full(folder / MANIFEST) from None
                raise InputError(f"{folder / MANIFEST}: not a readable imagegen manifest ({exc})") from None
            if owner is not None and owner != recipe_name and not adopt:
                conn.close()
                raise InputError(f"{folder}: is the run folder of recipe {owner!r}, not {recipe_name!r}; give this recipe "
                                 "its own `output:`, or pass `render --adopt` to make this run its own (the other "
                                 "recipe's images are kept as orphans and its picks as comments)")
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return store

    def _check_schema(self) -> None:
        try:
            done = {row[0] for row in self._conn.execute("SELECT name FROM _migrations")}
        except sqlite3.OperationalError:
            done = set()
        missing = [name for name, _ in MIGRATIONS if name not in done and name not in READ_OPTIONAL_STEPS]
        if missing:  # a render migrates right after taking the lock: it lost its journal
            holder = _render_holder(self.folder)
            if holder is not None:
                raise InputError(
                    f"{self.folder}: a render ({holder}) is running, but its manifest journal {MANIFEST}-wal was deleted "
                    "while it ran, so the manifest on disk does not show its work; its images are safe: let it finish "
                    "(or stop it) and run `imagegen render` again, which adopts every finished image")
        if missing:
            raise InputError(f"{self.folder / MANIFEST}: manifest is missing schema steps {', '.join(missing)}; "
                             "run `imagegen render` on this folder once to bring it up to date")

    def _transaction(self):
        """BEGIN IMMEDIATE ... COMMIT; rolls back on error (when SQLite has not already)."""
        return _Transaction(self._conn, self.folder)

    @staticmethod
    def _lock(folder: Path, wait: bool) -> int:
        path = folder / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (ValueError, OSError):
                holder = {}
            os.close(fd)
            who = f"PID {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "")
            since = time.strftime(" since %Y-%m-%d %H:%M", time.localtime(holder["since"])) if holder.get("since") else ""
            raise RunLockedError(f"{folder}: another imagegen ({who}{since}) is rendering into this run folder; "
                                 "wait for it to finish or pass --wait") from None
        # The kernel drops a flock when its process dies, so a lock left by a killed run is
        # simply taken over here; the PID inside is informational.
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        return fd

    def _migrate(self) -> None:
        c = self._conn
        c.execute("CREATE TABLE IF NOT EXISTS _migrations (id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
        done = {row[0] for row in c.execute("SELECT name FROM _migrations")}
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            with self._transaction():
                for statement in filter(str.strip, sql.split(";")):
                    c.execute(statement)
                # The id is the next free one, not the step's position: branches that add steps side
                # by side then never collide on a manifest that already ran one of them.
                c.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))

    def close(self) -> None:
        try:
            self._conn.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- recipe and metadata -----------------------------------------------------------------

    def freeze_recipe(self, text: str, sha256: str, name: str) -> None:
        """Keep the exact recipe text rendered (earlier versions go to recipe-history/)."""
        current = self.folder / "recipe.yaml"
        old_sha = self.get_meta("recipe_sha256")
        data = text.encode("utf-8")
        hist = self.folder / "recipe-history"
        if old_sha and old_sha != sha256 and current.exists():
            hist.mkdir(exist_ok=True)
            write_bytes_atomic(self.folder / recipe_history_name(old_sha), current.read_bytes())
        if len(data) > RECIPE_INLINE_BYTES and not (self.folder / recipe_history_name(sha256)).is_file():
            hist.mkdir(exist_ok=True)  # its images name this copy instead of carrying the text
            write_bytes_atomic(self.folder / recipe_history_name(sha256), data)
        if old_sha != sha256 or not current.exists():
            write_bytes_atomic(current, data)
            write_bytes_atomic(self.folder / "recipe.sha256", f"{sha256}  recipe.yaml\n".encode())
        self.set_meta("recipe_sha256", sha256)
        self.set_meta("recipe_name", name)

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # --- jobs ----------------------------------------------------------------------------------

    def sync_plan(self, jobs: Sequence[dict]) -> dict[str, int]:
        """Record the current plan: new jobs become pending, known ones take their new index,
        jobs no longer planned are marked orphaned (kept, never deleted)."""
        c = self._conn
        with self._transaction():
            before = {row[0] for row in c.execute("SELECT id FROM jobs")}
            c.execute("UPDATE jobs SET in_plan = 0")
            c.executemany(
                "INSERT INTO jobs (id, idx, job) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET idx = excluded.idx, job = excluded.job, in_plan = 1",
                [(j["id"], j["index"], json.dumps(j, ensure_ascii=False)) for j in jobs],
            )
            orphaned = c.execute("SELECT COUNT(*) FROM jobs WHERE in_plan = 0").fetchone()[0]
        ids = {j["id"] for j in jobs}
        return {"new": len(ids - before), "kept": len(ids & before), "orphaned": orphaned}

    def reconcile(self, verify: Callable[[Path, str], bool] | None = None) -> ReconcileReport:
        """Make manifest and files agree after a crash.

        Removes temporary files; adopts complete images that have no `done` row (after
        `verify(path, job_id)` returns True); puts `done` rows whose file is gone back to
        pending; renames images whose job index changed with a recipe edit."""
        report = ReconcileReport()
        for folder in (self.images, self.thumbs, self.thumbs / "inputs", self.sheets, self.folder, self.folder / "recipe-history"):
            report.temp_removed += remove_temp_files(folder)
        on_disk: dict[str, Path] = {}
        for p in self.images.glob("*.png"):
            m = IMAGE_NAME.match(p.name)
            if m:
                on_disk[m.group(2)] = p
            else:
                report.untracked.append(p.name)
        rows = {r.id: r for r in self.rows(include_orphans=True)}
        c = self._conn
        with self._transaction():
            for job_id, path in on_disk.items():
                row = rows.get(job_id)
                if row is None:
                    report.untracked.append(path.name)
                    continue
                target = self.images / image_name(row.index, job_id) if row.in_plan else path
                damage = png_problem(path, *final_size(row.job))
                if damage:  # a damaged file is never trusted: its job is rendered again (over it)
                    report.damaged.append(f"{path.name}: {damage}")
                    if row.status == "done":
                        c.execute("UPDATE jobs SET status = 'pending', file = NULL, sha256 = NULL, thumb = NULL WHERE id = ?",
                                  (job_id,))
                        report.reset_missing += 1
                    continue
                if row.status != "done":
                    if verify is not None and not verify(path, job_id):
                        report.untracked.append(path.name)
                        continue
                    sha = hashlib.sha256(path.read_bytes()).hexdigest()
                    c.execute("UPDATE jobs SET status = 'done', sha256 = ?, error = NULL, finished_at = ? WHERE id = ?",
                              (sha, path.stat().st_mtime, job_id))
                    report.adopted += 1
                if path != target:
                    os.replace(path, target)
                    old_thumb = self.thumbs / (path.stem + ".jpg")
                    if old_thumb.exists():
                        os.replace(old_thumb, self.thumbs / thumb_name(row.index, job_id))
                    report.renamed += 1
                    path = target
                thumb = self.thumbs / (path.stem + ".jpg")
                if not thumb.exists():  # killed between the image and its thumbnail
                    report.missing_thumbs.append((job_id, path, thumb))
                c.execute("UPDATE jobs SET file = ?, thumb = ? WHERE id = ?",
                          (str(path.relative_to(self.folder)), str(thumb.relative_to(self.folder)), job_id))
            for row in rows.values():
                if row.status == "done" and row.id not in on_disk:
                    c.execute("UPDATE jobs SET status = 'pending', file = NULL, sha256 = NULL, thumb = NULL WHERE id = ?", (row.id,))
                    report.reset_missing += 1
        if report.renamed:
            fsync_dir(self.images)
        return report

    def _row(self, r: sqlite3.Row) -> JobRow:
        try:
            job = json.loads(r["job"])
            if not isinstance(job, dict):
                raise ValueError("not a mapping")
        except (TypeError, ValueError, RecursionError):
            raise InputError(f"{self.folder / MANIFEST}: the row of job {r['id']} (#{r['idx']}) holds damaged job data; "
                             f"repair: sqlite3 {self.folder / MANIFEST} \"DELETE FROM jobs WHERE id = '{r['id']}'\" "
                             "then render the recipe again (that job is planned and rendered again)") from None
        return JobRow(r["id"], r["idx"], r["status"], bool(r["in_plan"]), r["file"], r["sha256"], r["thumb"], r["seconds"],
                      r["finished_at"], r["error"], r["attempts"], job,
                      r["joules"] if "joules" in r.keys() else None)  # a manifest read before 004_energy has none

    def rows(self, *, include_orphans: bool = False, status: str | None = None) -> list[JobRow]:
        """Job rows in index order (planned jobs first)."""
        sql = "SELECT * FROM jobs"
        where, args = [], []
        if not include_orphans:
            where.append("in_plan = 1")
        if status:
            where.append("status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY in_plan DESC, idx"
        return [self._row(r) for r in self._conn.execute(sql, args)]

    def pending_ids(self, *, retry_failed: bool = False) -> list[str]:
        """Ids of planned jobs still to render, in index order."""
        states = pending_states(retry_failed)
        marks = ",".join("?" * len(states))
        return [r[0] for r in self._conn.execute(f"SELECT id FROM jobs WHERE in_plan = 1 AND status IN ({marks}) ORDER BY idx", states)]

    def mark_done(self, job_id: str, *, file: Path, sha256: str, thumb: Path | None, seconds: float,
                  joules: float | None = None) -> None:
        """`joules`: the image's share of its batch's measured energy; None = not measured."""
        self._write(
            "UPDATE jobs SET status = 'done', file = ?, sha256 = ?, thumb = ?, seconds = ?, finished_at = ?, error = NULL, "
            "attempts = attempts + 1, joules = ? WHERE id = ?",
            (str(file.relative_to(self.folder)), sha256, str(thumb.relative_to(self.folder)) if thumb else None, seconds, time.time(),
             joules, job_id),
        )

    def mark_failed(self, job_id: str, error: str, seconds: float | None = None) -> None:
        self._write(
            "UPDATE jobs SET status = 'failed', error = ?, seconds = ?, finished_at = ?, attempts = attempts + 1 WHERE id = ?",
            (error[:2000], seconds, time.time(), job_id),
        )

    def _write(self, sql: str, args: tuple) -> None:
        """One autocommitted write; a full disk becomes DiskFullError."""
        try:
            self._conn.execute(sql, args)
        except sqlite3.OperationalError as exc:
            if is_disk_full(exc):
                raise disk_full(self.folder / MANIFEST) from None
            raise

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "pending": 0, "failed": 0, "orphaned": 0, "total": 0}
        for status, in_plan, n in self._conn.execute("SELECT status, in_plan, COUNT(*) FROM jobs GROUP BY status, in_plan"):
            if in_plan:
                out[status] += n
                out["total"] += n
            else:
                out["orphaned"] += n
        return out

    def status(self) -> dict:
        """Counts, recent render rate (images/s), last error and estimated time left."""
        out: dict = self.counts()
        out["folder"] = str(self.folder)
        out["recipe"] = self.get_meta("recipe_name")
        # Render rate from the images this folder actually rendered (adopted files have no
        # timing): recent per-image render seconds, so pauses between runs do not count.
        recent = [r[0] for r in self._conn.execute(
            "SELECT seconds FROM jobs WHERE status = 'done' AND seconds > 0 ORDER BY finished_at DESC LIMIT 200")]
        rate = len(recent) / sum(recent) if recent else None
        out["rate"] = rate
        out["eta_seconds"] = out["pending"] / rate if rate and out["pending"] else (0.0 if not out["pending"] else None)
        row = self._conn.execute(
            "SELECT idx, id, error FROM jobs WHERE status = 'failed' AND in_plan = 1 ORDER BY finished_at DESC LIMIT 1").fetchone()
        out["last_error"] = {"index": row[0], "id": row[1], "error": row[2]} if row else None
        out["workers"] = self.workers()
        # Energy of the images that have a measurement (None: nothing measured, never a guess).
        try:
            n, joules = self._conn.execute(
                "SELECT COUNT(joules), SUM(joules) FROM jobs WHERE status = 'done' AND in_plan = 1 AND joules IS NOT NULL").fetchone()
        except sqlite3.OperationalError:  # a manifest from before 004_energy, read without the lock
            n, joules = 0, None
        out["energy"] = {"measured_images": n, "wh_per_image": joules / n / 3600.0 if n else None,
                         "kwh": joules / 3.6e6 if n else None}
        out["orphans"] = [{"index": r.index, "id": r.id, "file": r.file} for r in self.rows(include_orphans=True) if not r.in_plan]
        return out

    def requeue(self, job_ids: Sequence[str]) -> None:
        """Put these done jobs back to pending (their damaged file is rendered again, over it)."""
        with self._transaction():
            for job_id in job_ids:
                self._conn.execute("UPDATE jobs SET status = 'pending', file = NULL, sha256 = NULL, thumb = NULL "
                                   "WHERE id = ? AND status = 'done'", (job_id,))

    def verify_files(self) -> list[dict]:
        """Every done job whose image is missing or differs from its recorded sha256 (a full
        read of each file): [{index, id, file, problem}]. Reads only; `render` re-queues the
        ones its start-up check (`png_problem`) catches."""
        bad = []
        for row in self.rows(status="done"):
            path = self.folder / row.file if row.file else None
            if path is None or not path.is_file():
                problem = "missing"
            else:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                problem = None if h.hexdigest() == row.sha256 else (
                    png_problem(path, *final_size(row.job)) or "sha256 differs from the manifest")
            if problem:
                bad.append({"index": row.index, "id": row.id, "file": row.file, "problem": problem})
        return bad

    # --- claims: the queue of a run with several workers ---------------------------------------
    #
    # The parent queues the run's pending jobs (`queue_jobs`); each worker claims a batch inside
    # a transaction (`claim`: the rows name the worker and carry a lease it renews), renders it
    # and releases each job once its image is recorded (`release`). A claim whose lease ran out
    # (a hung or killed worker) is claimable again; the parent also hands back at once the claims
    # of a worker it saw die (`unclaim_worker`). A job already done, or failed during this run,
    # is never handed out again, so no job is rendered twice by live workers.

    def queue_jobs(self, jobs: Sequence[tuple[str, int, str]]) -> None:
        """Make (job id, index, group) the run's queue, replacing any earlier one."""
        now = time.time()
        c = self._conn
        with self._transaction():
            c.execute("DELETE FROM claims")
            c.execute("DELETE FROM workers")
            c.executemany("INSERT INTO claims (id, idx, grp, queued_at) VALUES (?, ?, ?, ?)",
                          [(i, idx, grp, now) for i, idx, grp in jobs])

    _CLAIMABLE = ("FROM claims c JOIN jobs j ON j.id = c.id WHERE (c.worker IS NULL OR c.lease_until < ?) "
                  "AND j.status != 'done' AND NOT (j.status = 'failed' AND j.finished_at >= c.queued_at)")

    def claim(self, worker: str, count: int, *, lease: float, prefer_group: str | None = None) -> list[str]:
        """Claim up to `count` queued jobs of one group for `worker`, in index order; [] when none
        is left. The group is `prefer_group` while it has jobs (no model-state switch), else the
        first group no other worker holds, else the first group with claimable jobs."""
        now = time.time()
        c = self._conn
        with self._transaction():
            c.execute("DELETE FROM claims WHERE id IN (SELECT id FROM jobs WHERE status = 'done')")
            groups = [r[0] for r in c.execute(f"SELECT c.grp, MIN(c.idx) AS first {self._CLAIMABLE} GROUP BY c.grp ORDER BY first",
                                              (now,))]
            if not groups:
                return []
            held = {r[0] for r in c.execute("SELECT DISTINCT grp FROM claims WHERE worker IS NOT NULL AND worker != ? "
                                            "AND lease_until >= ?", (worker, now))}
            grp = prefer_group if prefer_group in groups else next((g for g in groups if g not in held), groups[0])
            ids = [r[0] for r in c.execute(f"SELECT c.id {self._CLAIMABLE} AND c.grp = ? ORDER BY c.idx LIMIT ?",
                                           (now, grp, max(1, count)))]
            c.executemany("UPDATE claims SET worker = ?, lease_until = ? WHERE id = ?", [(worker, now + lease, i) for i in ids])
        return ids

    def renew(self, worker: str, *, lease: float, rendered: int | None = None, seconds: float | None = None,
              state: str | None = None) -> int:
        """Extend the leases of `worker`'s claims (its heartbeat) and record its figures; returns
        how many claims it holds."""
        now = time.time()
        c = self._conn
        with self._transaction():
            held = c.execute("UPDATE claims SET lease_until = ? WHERE worker = ?", (now + lease, worker)).rowcount
            c.execute("UPDATE workers SET last_seen = ?, rendered = COALESCE(?, rendered), seconds = COALESCE(?, seconds), "
                      "state = COALESCE(?, state) WHERE name = ?", (now, rendered, seconds, state, worker))
        return held

    def release(self, job_ids: Iterable[str], worker: str) -> None:
        """Jobs `worker` finished (done or failed): out of the queue."""
        with self._transaction():
            self._conn.executemany("DELETE FROM claims WHERE id = ? AND worker = ?", [(i, worker) for i in job_ids])

    def unclaim_worker(self, worker: str) -> int:
        """Give the jobs `worker` holds back to the queue (it died or stopped); returns how many."""
        with self._transaction():
            return self._conn.execute("UPDATE claims SET worker = NULL, lease_until = NULL WHERE worker = ?", (worker,)).rowcount

    def queued(self) -> dict[str, int]:
        """The queue now: {'waiting': unclaimed or expired, 'claimed': under a live lease} (jobs
        not done nor failed during this run)."""
        now = time.time()
        waiting = self._conn.execute(f"SELECT COUNT(*) {self._CLAIMABLE}", (now,)).fetchone()[0]
        claimed = self._conn.execute(
            "SELECT COUNT(*) FROM claims c JOIN jobs j ON j.id = c.id WHERE c.worker IS NOT NULL AND c.lease_until >= ? "
            "AND j.status != 'done' AND NOT (j.status = 'failed' AND j.finished_at >= c.queued_at)", (now,)).fetchone()[0]
        return {"waiting": waiting, "claimed": claimed}

    def clear_queue(self) -> None:
        with self._transaction():
            self._conn.execute("DELETE FROM claims")

    def register_worker(self, name: str, *, pid: int, device: str, host: str | None = None) -> None:
        """A worker of this run (`host`: its machine, default this one; a Ray actor's node)."""
        now = time.time()
        self._write("INSERT INTO workers (name, pid, host, device, started_at, last_seen) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET pid = excluded.pid, host = excluded.host, device = excluded.device, "
                    "last_seen = excluded.last_seen",
                    (name, pid, host or socket.gethostname(), device, now, now))

    def set_worker_state(self, name: str, state: str) -> None:
        self._write("UPDATE workers SET state = ? WHERE name = ?", (state, name))

    def workers(self) -> list[dict]:
        """The workers of the last run with several: name, device, state, rendered, rate (img/s
        of render time), last_seen. [] for a manifest from before workers (or a one-worker run)."""
        try:
            rows = self._conn.execute("SELECT * FROM workers ORDER BY name").fetchall()
        except sqlite3.OperationalError:
            return []
        return [{"name": r["name"], "pid": r["pid"], "host": r["host"], "device": r["device"], "state": r["state"],
                 "rendered": r["rendered"], "rate": r["rendered"] / r["seconds"] if r["seconds"] > 0 else None,
                 "last_seen": r["last_seen"]} for r in rows]

    # --- picks --------------------------------------------------------------------------------

    def set_picks(self, indices: Iterable[int]) -> None:
        """Mirror the pick list into the manifest (picks.txt stays the source of truth)."""
        ids = {r.index: r.id for r in self.rows()}
        c = self._conn
        with self._transaction():
            c.execute("DELETE FROM picks")
            c.executemany("INSERT INTO picks (idx, id, added_at) VALUES (?, ?, ?)", [(i, ids.get(i), time.time()) for i in indices])

    # --- events -------------------------------------------------------------------------------

    def log(self, event: dict) -> None:
        """Append one event to log.jsonl (with a timestamp)."""
        line = json.dumps({"ts": round(time.time(), 3), **event}, ensure_ascii=False, default=str)
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")
