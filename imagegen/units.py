"""How durations are written for people: one function for the CLI, the server and the API."""

from __future__ import annotations


def fmt_eta(seconds: float | None) -> str:
    """`1h05m`, `4m07s`, `12s`, or `unknown` for None."""
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
