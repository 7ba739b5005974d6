"""Measured energy: joules read from hardware counters around each batch, or "not measured".

Sources, in the order tried for a device:
- NVIDIA GPUs: NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, millijoules
  since the driver loaded; Volta and newer) through `nvidia-ml-py`, NVIDIA's own binding, which
  talks to the local driver only. Optional: without the package (or on an older GPU) the
  GPU's energy is "not measured".
- CPU: Linux RAPL package counters (`/sys/class/powercap/intel-rapl:N/energy_uj`, microjoules,
  wrapping at `max_energy_range_uj`), when readable (root-only on Linux >= 5.10, absent on many
  VMs).

Nothing here guesses: a meter that cannot read its counter gives `None`, which the manifest,
`status` and the provenance record as "not measured". Nothing here opens a network connection.
No torch import.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RAPL_ROOT = Path("/sys/class/powercap")
_PACKAGE_DOMAIN = re.compile(r"intel-rapl:\d+")  # packages; intel-rapl:N:M are sub-domains inside them
JOULES_PER_KWH = 3.6e6


@dataclass
class Meter:
    """A cumulative energy counter. `read()` gives joules since some fixed origin, or None."""

    source: str  # "nvml:0", "rapl", or "none"
    _read: Callable[[], float | None]

    def read(self) -> float | None:
        try:
            return self._read()
        except Exception:  # a counter that fails now is "not measured", never a crash
            return None

    @property
    def measured(self) -> bool:
        return self.source != "none"


class Span:
    """Joules and seconds between `start()` and `stop()` on one meter (None when unreadable)."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.joules: float | None = None
        self.seconds = 0.0
        self._e0: float | None = None
        self._t0 = 0.0

    def start(self) -> "Span":
        self._e0, self._t0 = self.meter.read(), time.monotonic()
        return self

    def stop(self) -> "Span":
        e1 = self.meter.read()
        self.seconds = time.monotonic() - self._t0
        self.joules = None if e1 is None or self._e0 is None or e1 < self._e0 else e1 - self._e0
        return self

    def __enter__(self) -> "Span":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


NOT_MEASURED = Meter("none", lambda: None)


def rapl_meter(root: Path = RAPL_ROOT) -> Meter:
    """The sum of the RAPL package counters under `root`, unwrapped; NOT_MEASURED when there
    are none or they cannot be read."""
    domains = sorted(p for p in root.glob("intel-rapl:*") if _PACKAGE_DOMAIN.fullmatch(p.name))
    counters = []
    for d in domains:
        try:
            wrap = int((d / "max_energy_range_uj").read_text())
            int((d / "energy_uj").read_text())
        except (OSError, ValueError):
            continue
        counters.append((d / "energy_uj", wrap))
    if not counters:
        return NOT_MEASURED
    state = {"last": [None] * len(counters), "total": [0] * len(counters)}

    def read() -> float | None:
        for i, (path, wrap) in enumerate(counters):
            now = int(path.read_text())
            last = state["last"][i]
            if last is not None:
                state["total"][i] += now - last if now >= last else now + wrap - last  # one wrap between reads
            state["last"][i] = now
        return sum(state["total"]) / 1e6

    read()  # the origin
    return Meter("rapl", read)


def nvml_meter(index: int) -> Meter:
    """NVML's energy counter of GPU `index`; NOT_MEASURED without nvidia-ml-py, a driver, or a
    GPU that has the counter (Volta and newer)."""
    try:
        import pynvml  # the module of the `nvidia-ml-py` package

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:
        return NOT_MEASURED
    return Meter(f"nvml:{index}", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0)


def meter_for(device: str) -> Meter:
    """The meter that measures `device` ("cuda", "cuda:1", "cpu")."""
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return nvml_meter(index)
    return rapl_meter()


def watt_hours(joules: float | None) -> float | None:
    return None if joules is None else joules / 3600.0
