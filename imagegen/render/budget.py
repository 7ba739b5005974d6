"""Time and energy budgets for a render: stop cleanly before the next batch would pass them.

    render --until 07:00      the wall clock the GPU must be free by (the next 07:00 from now)
    render --max-hours 6.5    hours from the start of the command
    render --max-kwh 2.0      measured energy of the batches (needs a meter: see imagegen.energy)

The estimate of the next batch is this run's own rate so far (seconds and joules per image of
the batches rendered) times the batch's size; the first batch always runs unless the deadline
has passed already (there is nothing to estimate from). Torch-free; no printing.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from imagegen.energy import JOULES_PER_KWH
from imagegen.errors import InputError

_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_until(text: str, now: datetime | None = None) -> float:
    """The epoch seconds of the next `HH:MM` (local time) after `now`. Raises InputError."""
    m = _CLOCK.match(str(text).strip())
    if not m:
        raise InputError(f"`--until` takes a time of day as HH:MM (24 h, local time), got {text!r}")
    now = now or datetime.now()
    at = now.replace(hour=int(m.group(1)), minute=int(m.group(2)), second=0, microsecond=0)
    if at <= now:
        at += timedelta(days=1)
    return at.timestamp()


@dataclass
class Budget:
    """`deadline`: epoch seconds by which the last batch must have finished; `max_joules`: energy
    the batches may use. None = no limit."""

    deadline: float | None = None
    max_joules: float | None = None

    @classmethod
    def from_options(cls, *, until: str | None = None, max_hours: float | None = None, max_kwh: float | None = None,
                     now: float | None = None) -> "Budget":
        """Raises InputError for a bad `until` or a limit that is not positive."""
        now = time.time() if now is None else now
        ends = []
        if until is not None:
            ends.append(parse_until(until, datetime.fromtimestamp(now)))
        if max_hours is not None:
            if not max_hours > 0:
                raise InputError(f"`--max-hours` must be more than 0, got {max_hours}")
            ends.append(now + max_hours * 3600.0)
        if max_kwh is not None and not max_kwh > 0:
            raise InputError(f"`--max-kwh` must be more than 0, got {max_kwh}")
        return cls(min(ends) if ends else None, max_kwh * JOULES_PER_KWH if max_kwh is not None else None)

    def __bool__(self) -> bool:
        return self.deadline is not None or self.max_joules is not None

    def after(self, joules: float | None) -> "Budget":
        """What is left for the next recipe of a queue once a render used `joules`."""
        left = None if self.max_joules is None else max(0.0, self.max_joules - (joules or 0.0))
        return Budget(self.deadline, left)


@dataclass
class Tally:
    """What this render's batches took so far."""

    images: int = 0
    seconds: float = 0.0
    joules: float | None = 0.0  # None once any batch was not measured
    batches: int = 0
    measured: bool = True

    def add(self, images: int, seconds: float, joules: float | None) -> None:
        self.images += images
        self.seconds += seconds
        self.batches += 1
        if joules is None:
            self.measured = False
            self.joules = None
        elif self.joules is not None:
            self.joules += joules


@dataclass
class BudgetCheck:
    budget: Budget
    tally: Tally = field(default_factory=Tally)

    def stop_reason(self, next_images: int, now: float | None = None) -> str | None:
        """Why the next batch of `next_images` must not start, or None."""
        b, t = self.budget, self.tally
        now = time.time() if now is None else now
        if b.max_joules is not None and b.max_joules <= 0:
            return "budget reached: no energy left of --max-kwh"
        if b.deadline is not None:
            est = t.seconds / t.images * next_images if t.images else 0.0
            if now + est > b.deadline:
                at = datetime.fromtimestamp(b.deadline).strftime("%H:%M")
                return (f"budget reached: the next batch (~{est:.0f} s) would end after {at}" if est
                        else f"budget reached: it is past {at}")
        if b.max_joules is not None and t.images and t.joules is not None:
            est_j = t.joules / t.images * next_images
            if t.joules + est_j > b.max_joules:
                return (f"budget reached: {t.joules / JOULES_PER_KWH:.3f} kWh used, the next batch (~{est_j / 3600:.1f} Wh) "
                        f"would pass {b.max_joules / JOULES_PER_KWH:g} kWh")
        return None
