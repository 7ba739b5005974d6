"""Batching and the out-of-memory policy.

Jobs that share model state and latent shape (`Job.group_key`) go into one batch, at most
`batch_size` at a time, in plan order (which keeps each LoRA stack together, so costly LoRA
switches are outermost). Out of memory halves the batch size, down to 1, and the batch is
queued again; at batch size 1 its jobs fail.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from imagegen.plan import Job


class Batches:
    """The queue of pending jobs, handed out as batches."""

    def __init__(self, jobs: Sequence[Job], batch_size: int) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.group_key, []).append(job)
        self.queue: deque[Job] = deque(j for g in groups.values() for j in g)
        self.batch_size = batch_size

    def __bool__(self) -> bool:
        return bool(self.queue)

    def __len__(self) -> int:
        return len(self.queue)

    def next(self) -> list[Job]:
        """The next batch: up to `batch_size` queued jobs with one group key."""
        batch = [self.queue.popleft()]
        while self.queue and len(batch) < self.batch_size and self.queue[0].group_key == batch[0].group_key:
            batch.append(self.queue.popleft())
        return batch

    def out_of_memory(self, batch: list[Job]) -> bool:
        """Apply the OOM policy to `batch`: True when the batch size was halved and the batch
        queued again; False at batch size 1 (the caller fails its jobs)."""
        if self.batch_size == 1:
            return False
        self.batch_size = max(1, self.batch_size // 2)
        self.queue.extendleft(reversed(batch))
        return True
