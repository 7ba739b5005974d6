"""Batching, the out-of-memory policy, and when a run of failures stops the render.

Jobs that share model state and latent shape (`Job.group_key`) go into one batch, at most
`batch_size` at a time, in plan order (which keeps each LoRA stack together, so costly LoRA
switches are outermost).

Out of memory is a property of the image size, not of the run: an OOM halves the batch size of
that size only (`memory_key`: an OOM at 1024 px leaves 512 px batches alone), and the batch is
queued again. A batch of one job that runs out of memory fails: there is nothing smaller to try.
After `GROW_AFTER` good batches at a halved size the size is doubled once more (memory on a
shared GPU comes back); when that try runs out of memory too, the halved size holds for the
rest of the run.

A batch whose every job failed (an exception, or an error for each image) is held back, not
recorded at once: when `MAX_FAILED_BATCHES` such batches come in a row, the cause is the machine
or the model rather than the jobs, and the render stops with their jobs still pending. A good
batch in between releases the held ones as ordinary failures.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

from imagegen.errors import ImagegenError
from imagegen.plan import Job

GROW_AFTER = 8  # good batches at a halved size before one try at twice that size
MAX_FAILED_BATCHES = 3  # failed batches in a row that stop the render


class RenderStopped(ImagegenError):
    """The render stopped because the device or the model keeps failing; nothing is lost, the
    jobs not rendered stay pending (exit code 1)."""


def memory_key(job: Job) -> tuple:
    """What a batch's memory use depends on: the image size (and a second pass, when a job has one)."""
    return (job.width, job.height, repr(getattr(job, "hires", None)))


class Batches:
    """The queue of pending jobs, handed out as batches."""

    def __init__(self, jobs: Sequence[Job], batch_size: int) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.group_key, []).append(job)
        self.queue: deque[Job] = deque(j for g in groups.values() for j in g)
        self.requested = batch_size
        self.batch_size = batch_size  # the size of the batch handed out last
        self._sizes: dict[tuple, int] = {}  # memory key -> batch size after an OOM
        self._good: dict[tuple, int] = {}  # memory key -> good batches since its last change
        self._grown: set[tuple] = set()  # keys whose size was doubled back once
        self._fixed: set[tuple] = set()  # keys whose doubling ran out of memory: the size holds

    def __bool__(self) -> bool:
        return bool(self.queue)

    def __len__(self) -> int:
        return len(self.queue)

    def size_for(self, job: Job) -> int:
        return self._sizes.get(memory_key(job), self.requested)

    def next(self) -> list[Job]:
        """The next batch: up to the size for its image size, queued jobs with one group key."""
        batch = [self.queue.popleft()]
        size = self.batch_size = self.size_for(batch[0])
        while self.queue and len(batch) < size and self.queue[0].group_key == batch[0].group_key:
            batch.append(self.queue.popleft())
        return batch

    def out_of_memory(self, batch: list[Job], ran: int | None = None) -> bool:
        """Apply the OOM policy to `batch`, which ran as `ran` images (default: its jobs; more
        when a compiled engine padded it): True when its size's batch size was halved and the
        batch queued again; False when it ran as one image (the caller fails it)."""
        ran = ran or len(batch)
        if ran == 1:
            return False
        key = memory_key(batch[0])
        if key in self._grown:
            self._fixed.add(key)
        self._sizes[key] = self.batch_size = max(1, ran // 2)
        self._good[key] = 0
        self.queue.extendleft(reversed(batch))
        return True

    def succeeded(self, batch: list[Job]) -> None:
        """A batch ran without running out of memory: count it toward trying a larger size again."""
        key = memory_key(batch[0])
        size = self._sizes.get(key)
        if size is None or key in self._fixed or len(batch) < size:
            return
        self._good[key] = self._good.get(key, 0) + 1
        if self._good[key] >= GROW_AFTER:
            self._good[key] = 0
            self._grown.add(key)
            if 2 * size >= self.requested:
                del self._sizes[key]
            else:
                self._sizes[key] = 2 * size


class FailureStreak:
    """Failed batches in a row, their failures held back until a good batch releases them."""

    def __init__(self, limit: int = MAX_FAILED_BATCHES) -> None:
        self.limit = limit
        self.held: list[tuple[Any, ...]] = []  # (job, error, seconds) of the batches in the streak
        self.batches = 0

    def failed(self, failures: list[tuple[Any, ...]]) -> bool:
        """Hold one failed batch's failures; True when the streak has reached the limit."""
        self.held.extend(failures)
        self.batches += 1
        return self.batches >= self.limit

    def release(self) -> list[tuple[Any, ...]]:
        """The held failures (to record now); the streak starts again."""
        out, self.held, self.batches = self.held, [], 0
        return out

    @property
    def last_error(self) -> str:
        return self.held[-1][1] if self.held else ""
