"""Measured render rates on this machine, for `plan` to estimate a run's duration and energy.

One small JSON file in the cache (`render-history.json` under `defaults.cache_root()`): per
(host, model, width, height, steps, device) the images rendered, their seconds and, where a
meter measured them, their joules. Each render adds what its batches took; old figures fade
(the counts are halved past `KEEP_IMAGES`), so a new GPU driver or dtype shows through soon.
Rates are per image of the batch sizes actually used. Torch-free; no printing. The file is
advisory: an unreadable one is treated as empty, a failed write is ignored. Saving reads,
merges and writes it under an flock (`render-history.json.lock`), so renders finishing at once
in several processes (workers, two GPUs, the review server's queue) never lose each other's
figures.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from imagegen.defaults import cache_root
from imagegen.fsutil import locked, write_bytes_atomic

FILE_NAME = "render-history.json"
KEEP_IMAGES = 2000  # images per entry before older figures are halved


def job_model(job: Any) -> str:
    """The model part of a job's history key: the checkpoint, plus its hires pass when it has one
    (a second pass changes the time per image)."""
    hr = getattr(job, "hires", None)
    return job.checkpoint if hr is None else f"{job.checkpoint} +hires {hr.width}x{hr.height} {hr.steps} steps"


def history_file() -> Path:
    return cache_root() / FILE_NAME


def _key(host: str, model: str, width: int, height: int, steps: int, device: str) -> str:
    return json.dumps([host, model, width, height, steps, device])


def _load(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
        return dict(data.get("rates", {})) if data.get("version") == 1 else {}
    except (OSError, ValueError, AttributeError):
        return {}


class RateLog:
    """What one render's batches took, per model / size / steps; `save()` merges it into the file."""

    def __init__(self, device: str, path: Path | None = None) -> None:
        self.device = device
        self.path = path or history_file()
        self.host = socket.gethostname()
        self._new: dict[str, dict] = {}

    def add(self, model: str, width: int, height: int, steps: int, images: int, seconds: float,
            joules: float | None) -> None:
        key = _key(self.host, model, width, height, steps, self.device)
        e = self._new.setdefault(key, {"images": 0, "seconds": 0.0, "joules": 0.0, "joule_images": 0})
        e["images"] += images
        e["seconds"] += seconds
        if joules is not None:
            e["joules"] += joules
            e["joule_images"] += images

    def save(self) -> None:
        """Merge into the history file (atomic write). Never raises for an unwritable cache."""
        if not self._new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        with locked(self.path.with_name(self.path.name + ".lock"), required=False):
            rates = _load(self.path)
            for key, new in self._new.items():
                old = rates.get(key, {"images": 0, "seconds": 0.0, "joules": 0.0, "joule_images": 0})
                merged = {k: old.get(k, 0) + new[k] for k in new}
                while merged["images"] > KEEP_IMAGES:
                    merged = {k: v / 2 for k, v in merged.items()}
                merged["updated"] = time.time()
                rates[key] = merged
            try:
                write_bytes_atomic(self.path, json.dumps({"version": 1, "rates": rates}, indent=1).encode())
            except OSError:
                pass
        self._new = {}


@dataclass
class Estimate:
    jobs: int
    known: int  # jobs with a measured rate
    seconds: float  # for the known jobs
    joules: float | None  # for the known jobs, when every one of them has a measured energy
    devices: list[str]
    unknown: list[str]  # "model WxH N steps" without history

    def describe(self) -> str:
        """One line for `plan`."""
        if not self.known:
            what = "; ".join(self.unknown[:3]) + (" ..." if len(self.unknown) > 3 else "")
            return f"estimate: no render history on this machine for {what} (render once to measure)"
        energy = f", {self.joules / 3.6e6:.3g} kWh" if self.joules is not None else ", energy not measured"
        part = "" if self.known == self.jobs else f" for {self.known} of {self.jobs} jobs (no history for {'; '.join(self.unknown[:3])})"
        return (f"estimate: {_duration(self.seconds)}{energy}{part}, from earlier runs on this machine "
                f"({', '.join(self.devices)})")


def estimate(jobs: Iterable[Any], path: Path | None = None) -> Estimate:
    """Duration and energy of `jobs` (plan Jobs: checkpoint, width, height, steps) from the
    history of this host; for a size with history on several devices, the one with most images."""
    rates = _load(path or history_file())
    host = socket.gethostname()
    best: dict[tuple, dict] = {}
    for key, e in rates.items():
        try:
            h, model, w, hh, steps, device = json.loads(key)
        except (ValueError, TypeError):
            continue
        k = (model, w, hh, steps)
        if h == host and e.get("images", 0) > 0 and e["images"] > best.get(k, {}).get("images", 0):
            best[k] = {**e, "device": device}
    counts: dict[tuple, int] = {}
    for j in jobs:
        k = (job_model(j), j.width, j.height, j.steps)
        counts[k] = counts.get(k, 0) + 1
    seconds, joules, known, devices, unknown = 0.0, 0.0, 0, [], []
    for k, n in counts.items():
        e = best.get(k)
        if e is None:
            unknown.append(f"{k[0]} {k[1]}x{k[2]} {k[3]} steps")
            continue
        known += n
        seconds += n * e["seconds"] / e["images"]
        if joules is not None and e.get("joule_images"):
            joules += n * e["joules"] / e["joule_images"]
        else:
            joules = None
        if e["device"] not in devices:
            devices.append(e["device"])
    return Estimate(sum(counts.values()), known, seconds, joules if known else None, devices, unknown)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"~{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"~{minutes} min"
