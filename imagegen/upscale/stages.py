"""Running the upscaler's stages side by side: ordered thread maps, a producer thread with a
small bounded queue, and per-stage timing that stays meaningful when stages overlap.

The stages of the last model pass (model -> final resize -> alpha -> encoding) are iterators
of uint8 row strips, each pulling from the one before. Sequentially, one thread pulls them
all and the wall time is the sum of the stages. Overlapped, `prefetch` runs a stage in a
thread of its own that fills a queue of `QUEUE_DEPTH` strips, so the model computes the next
band while the previous one is resized and encoded; the wall time then approaches the slowest
stage when there are cores to spare. Both paths hand the same strips to the same writer in
the same order: the output file is byte for byte the same.

`Timed` measures a stage inclusively (time spent in its `next`, in the thread that pulls it);
a stage's own time is its inclusive time minus the inclusive time of what it pulls from, both
measured in the same thread (for a stage pulling from a queue: the time it waited on it).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Defaults, one place.
THREADS = max(1, min(8, os.cpu_count() or 1))  # threads for the parallel resize and the deflate of each stage
QUEUE_DEPTH = 3  # strips a producer stage may run ahead of its consumer (bounds the memory held)
_POLL_S = 0.1  # how often a blocked producer checks whether its consumer has gone


def pipelined(items: Iterable[T], fn: Callable[[T], R], *, workers: int, depth: int) -> Iterator[R]:
    """`map(fn, items)` in order, with up to `depth` calls running in `workers` threads.

    `workers` 0 is a plain `map` in the calling thread (the sequential path). Otherwise the
    producer of `items` keeps running in the calling thread while earlier items are processed
    (zlib, Pillow's resize and numpy release the GIL).
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) >= depth or (pending and pending[0].done()):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


class Timed(Generic[T]):
    """An iterator that adds the seconds spent in each `next` of `source` to `seconds`."""

    def __init__(self, source: Iterable[T]) -> None:
        self.source = iter(source)
        self.seconds = 0.0

    def __iter__(self) -> Timed[T]:
        return self

    def __next__(self) -> T:
        t0 = time.perf_counter()
        try:
            return next(self.source)
        finally:
            self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


_ITEM, _END, _ERROR = 0, 1, 2


def prefetch(source: Iterable[T], *, depth: int = QUEUE_DEPTH, name: str = "stage") -> Iterator[T]:
    """Yield the items of `source`, computed ahead in a thread of their own (at most `depth`
    waiting). An exception in `source` is raised here, at the item where it happened. When
    the consumer stops early (an error downstream, `close()`), the thread stops at its next
    item and `source` is closed in that thread."""
    q: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(msg: tuple[int, object]) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        it = iter(source)
        try:
            for item in it:
                if not put((_ITEM, item)):
                    return
            put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((_ERROR, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=f"imagegen-upscale-{name}", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == _ITEM:
                yield value  # type: ignore[misc]
            elif kind == _END:
                return
            else:
                raise value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
