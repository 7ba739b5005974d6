"""Atomic files: every file imagegen writes is complete or absent, even after kill -9.

Bytes go to a temporary file in the same folder (named `.tmp-<name>.<pid>.<random>`), are
flushed and fsynced, then renamed over the target, and the folder is fsynced. Anything that
starts with `.tmp-` is ours and half-written; `remove_temp_files` clears it on the next start.
`locked` holds an flock around a read-change-write of a shared file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
from pathlib import Path
from typing import IO, Callable, Iterator

from imagegen.defaults import TMP_PREFIX


_OUR_TEMP = re.compile(re.escape(TMP_PREFIX) + r".+\.\d+(\.[0-9a-f]{6})?")


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


class _CheckedRaw(io.RawIOBase):
    """The temporary file as a raw stream that never loses a short write: every `write` loops
    until all bytes are out and raises ENOSPC when the disk takes none. It has no `fileno()`,
    so Pillow cannot bypass it with its own C writes (which ignore short writes). `high` is
    the largest offset written: the size the finished file must have."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.high = 0

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = _os_write(self.fd, view[done:])
            if n <= 0:
                raise OSError(errno.ENOSPC, "no space left on device (short write)")
            done += n
        self.high = max(self.high, os.lseek(self.fd, 0, os.SEEK_CUR))
        return done

    def readinto(self, buffer) -> int:
        data = os.read(self.fd, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def close(self) -> None:  # the fd is closed by write_atomic after fsync
        super().close()


_os_write = os.write  # the one low-level write; tests put a failing disk here


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` so that it is either complete or absent.

    The file object loses no short write (see `_CheckedRaw`); once `write` returns, the bytes
    on disk are checked against what was written, fsynced, and only then renamed over `path`.
    Creates the parent folder if missing. On any error the temporary file is removed, `path`
    is untouched, and the error re-raised (OSError with errno ENOSPC for a full disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    raw = _CheckedRaw(fd)
    handle = io.BufferedRandom(raw, buffer_size=1 << 20)
    try:
        try:
            write(handle)
            handle.flush()
            size = os.fstat(fd).st_size
            if size != raw.high:
                raise OSError(errno.EIO, f"wrote {raw.high} bytes but the file holds {size}", str(tmp))
            os.fsync(fd)
        finally:
            raw.fd = -1  # a later flush of leftover buffered bytes cannot reach a reused descriptor
            os.close(fd)
            try:
                handle.close()
            except (OSError, ValueError):
                pass  # the bytes it still held belonged to a file that is being removed
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            exc.filename = str(path)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `write_atomic`)."""
    write_atomic(path, lambda handle: handle.write(data))


def not_a_regular_file(path: Path, *, folder_ok: bool = False) -> str | None:
    """Why an input path that exists cannot be read as a file (a device such as /dev/zero never
    ends, a FIFO blocks forever): None for a regular file (or a folder with `folder_ok`) and for a
    missing path (the caller says "not found")."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"is {kind}, not a regular file" + (" or model folder" if folder_ok else "")


def is_our_temp(name: str) -> bool:
    """True for a name `temp_path` makes (`.tmp-<name>.<pid>.<6 hex>`)."""
    return name.startswith(TMP_PREFIX) and _OUR_TEMP.fullmatch(name) is not None


def _writer_alive(temp_name: str) -> bool:
    """True when the process whose PID the temp name carries still runs imagegen (a concurrent
    `pick`, `sheet` or upscale writing there now); its file is not a leftover."""
    m = _OUR_TEMP.fullmatch(temp_name)
    pid_text = temp_name.rsplit(".", 2)[-2] if m and m.group(1) else temp_name.rsplit(".", 1)[-1]
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # ours: a write of this process that never finished
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: a live PID is taken as a live writer
    return b"imagegen" in cmdline or b"python" in cmdline


def remove_temp_files(folder: Path, name: str | None = None) -> int:
    """Delete our half-written temporary files in `folder` (only those for `name`, if given),
    except those of a live imagegen process writing there now; returns how many were removed."""
    if not folder.is_dir():
        return 0
    prefix = TMP_PREFIX + (f"{name}." if name else "")
    removed = 0
    for p in folder.iterdir():
        # Only names `temp_path` makes (`.tmp-<name>.<pid>.<6 hex>`): a user's `.tmp-notes.txt` stays.
        if p.name.startswith(prefix) and _OUR_TEMP.fullmatch(p.name) and p.is_file() and not p.is_symlink() \
                and not _writer_alive(p.name):
            try:
                p.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


@contextlib.contextmanager
def locked(lock_file: Path, *, required: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `lock_file` (created if needed; blocking) for the block, across
    processes and threads (each call opens its own file description); yields True. When the
    lock file cannot be created (a read-only folder) OSError is raised, or with `required=False`
    the block runs unlocked and gets False (for data that is only advisory)."""
    import fcntl

    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if required:
            raise
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the flock
