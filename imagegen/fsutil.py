"""Atomic files: every file imagegen writes is complete or absent, even after kill -9.

Bytes go to a temporary file in the same folder (named `.tmp-<name>.<pid>.<random>`), are
flushed and fsynced, then renamed over the target, and the folder is fsynced. Anything that
starts with `.tmp-` is ours and half-written; `remove_temp_files` clears it on the next start.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Callable

from imagegen.defaults import TMP_PREFIX


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path`."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(3)}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` so that it is either complete or absent.

    Creates the parent folder if missing. On any error the temporary file is removed and
    the error re-raised (OSError with errno ENOSPC for a full disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `write_atomic`)."""
    write_atomic(path, lambda handle: handle.write(data))


def remove_temp_files(folder: Path, name: str | None = None) -> int:
    """Delete our half-written temporary files in `folder` (only those for `name`, if given);
    returns how many were removed."""
    if not folder.is_dir():
        return 0
    prefix = TMP_PREFIX + (f"{name}." if name else "")
    removed = 0
    for p in folder.iterdir():
        if p.name.startswith(prefix) and p.is_file():
            try:
                p.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed
