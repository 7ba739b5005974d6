"""One GPU, one renderer: a lock per accelerator device, so that two renders (a plain
`imagegen render` and the `imagegen serve` queue, or two people) never load models onto the
same GPU at once and both run out of memory.

The lock is an flock on `<cache>/locks/device-cuda-N.lock` (N the physical GPU: the index in
CUDA_VISIBLE_DEVICES when that is set), dropped by the kernel when the process dies. It is
re-entrant within a process (the serve queue holds it while a model stays loaded between
recipes, and the render inside takes it again). The CPU is not locked. torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from imagegen.defaults import cache_root
from imagegen.errors import RunLockedError

WAIT_POLL = 1.0  # seconds between tries while waiting for a busy device

_held: dict[str, list] = {}  # lock key -> [fd, depth] for the locks this process holds
_guard = threading.Lock()


def device_key(device: str) -> str | None:
    """'cuda-1' for cuda:1 (physical index through CUDA_VISIBLE_DEVICES), 'mps' for mps;
    None for the CPU, which is not locked."""
    dev = device.strip().lower()
    kind, _, index = dev.partition(":")
    if kind == "cpu":
        return None
    if kind != "cuda":
        return kind
    n = int(index) if index.isdigit() else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"cuda-{visible[n] if n < len(visible) else n}"


class DeviceBusyError(RunLockedError):
    """Another imagegen process renders on this device."""


@contextlib.contextmanager
def device_lock(device: str, *, wait: bool = False, on_wait: Callable[[str], None] | None = None,
                holder: str = "imagegen render") -> Iterator[None]:
    """Hold the lock of `device` (a resolved torch device name) for the block. Without `wait`,
    raises DeviceBusyError naming the process that holds it; with `wait`, calls `on_wait(msg)`
    once and blocks until it is free."""
    key = device_key(device)
    if key is None:
        yield
        return
    with _guard:
        if key in _held:
            _held[key][1] += 1
            fd = None
        else:
            fd = _acquire(key, device, wait, on_wait, holder)
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                os.close(_held.pop(key)[0])


def _acquire(key: str, device: str, wait: bool, on_wait: Callable[[str], None] | None, holder: str) -> int:
    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"device-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        message = _busy_message(fd, device)
        if not wait:
            os.close(fd)
            raise DeviceBusyError(f"{message}; wait for it to finish or pass --wait")
        if not said and on_wait is not None:
            on_wait(f"{message}; waiting for it")
            said = True
        time.sleep(WAIT_POLL)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": holder}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _busy_message(fd: int, device: str) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        info = {}
    since = time.strftime(" since %H:%M", time.localtime(info["since"])) if info.get("since") else ""
    return f"device {device} is busy: {info.get('what', 'another imagegen')} (PID {info.get('pid', '?')}{since}) renders on it"
