"""Benchmark: contact sheets and index.html for a run of 1000 renders of 1024x1024.

Not a test. Builds a synthetic run folder (thumbnails made the way the image writer makes
them, from a 1024x1024 image in memory, plus small placeholder PNGs), then times
`write_sheets` (plain, --by, --x/--y) and `write_index_html` in a fresh child process pinned
to 2 CPU cores, and reports its wall time and peak memory (max RSS).

    .venv/bin/python bench/sheet.py                 # 1000 jobs in a temporary folder
    .venv/bin/python bench/sheet.py --jobs 200 --run /tmp/run --keep

Targets (issue 5): under 20 s on 2 cores, peak memory under 1 GB.

    .venv/bin/python bench/sheet.py --browser       # also time index.html in headless chromium

`--browser` opens the index in Debian's chromium (playwright, as the browser test does) and
times page load, one filter change and one pick toggle: the responsiveness figures that used
to be timed assertions in tests/test_index_browser.py (targets: load < 10 s, filter and pick
< 500 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 20.0
TARGET_RSS_MB = 1024.0
PROMPTS = [
    "#1 a red chair in a sunlit room, film grain, 35mm",
    "#2 a blue chair & a <small> table, studio light",
    "#3 an oak chair on a beach at dusk, wide angle",
    "#4 a chair made of glass, product photo, white background",
    "#5 a very long prompt about a chair " + "with many details " * 6,
]
LORA_WEIGHTS = ["0.2", "0.5", "0.8", "1.0"]


def job_axes(jobs: int) -> list[dict[str, str]]:
    """prompt x LoRA weight x seed, as many as asked (1000: 5 x 4 x 50)."""
    axes = []
    seed = 1000
    while len(axes) < jobs:
        for prompt in PROMPTS:
            for weight in LORA_WEIGHTS:
                axes.append({"prompt": prompt, "lora:detail": weight, "seed": str(seed), "steps": "30"})
        seed += 1
    return axes[:jobs]


def build_run(run: Path, jobs: int) -> float:
    """Write thumbs/ and placeholder images/ for `jobs` renders; return seconds per thumbnail."""
    import numpy as np
    from PIL import Image

    from imagegen.thumbs import make_thumbnail, save_thumbnail_atomic

    (run / "images").mkdir(parents=True, exist_ok=True)
    (run / "axes").mkdir(exist_ok=True)
    # A few smooth pictures with some noise, so the JPEG work is like a real render's; each
    # job blends two of them.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024].astype(np.float32) / 1024
    bases = []
    for _ in range(8):
        phase = rng.uniform(0, 6.28, size=3)
        pixels = np.stack([np.sin(6 * xx + 4 * yy * k + p) for k, p in enumerate(phase, 1)], axis=2) * 100 + 128
        pixels += rng.normal(0, 12, size=(64, 64, 1)).repeat(16, 0).repeat(16, 1)
        bases.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"))
    thumb_seconds = 0.0
    for index, axes in enumerate(job_axes(jobs), start=1):
        name = f"{index:04d}-{index * 2654435761 % 2**32:08x}"
        image = Image.blend(bases[index % 8], bases[(index * 3 + 1) % 8], (index % 10) / 10)
        started = time.perf_counter()
        save_thumbnail_atomic(make_thumbnail(image), run / "thumbs" / f"{name}.jpg")
        thumb_seconds += time.perf_counter() - started
        image.resize((16, 16)).save(run / "images" / f"{name}.png")  # placeholder: sheets never read it
        (run / "axes" / f"{name}.json").write_text(json.dumps(axes))
    return thumb_seconds / jobs


def measure(run: Path) -> dict[str, float]:
    """In this (fresh) process: time each sheet layout and the index; report peak RSS."""
    from imagegen.sheets import SheetItem, write_index_html, write_sheets

    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:2]
        os.sched_setaffinity(0, cpus)
    items = []
    for thumb in sorted((run / "thumbs").glob("*.jpg")):
        axes = json.loads((run / "axes" / f"{thumb.stem}.json").read_text())
        index, job_id = thumb.stem.split("-", 1)
        items.append(
            SheetItem(int(index), job_id, thumb, run / "images" / f"{thumb.stem}.png", axes, picked=int(index) % 20 == 0)
        )
    figures: dict[str, float] = {"jobs": len(items)}
    total = time.perf_counter()
    for label, options in (
        ("plain", {}),
        ("by_prompt", {"by": "prompt"}),
        ("xy_lora_prompt", {"x": "lora:detail", "y": "prompt"}),
    ):
        started = time.perf_counter()
        pages = write_sheets(items, run / "sheets", title="bench: 1000 chairs", **options)
        figures[f"{label}_s"] = time.perf_counter() - started
        figures[f"{label}_pages"] = len(pages)
    started = time.perf_counter()
    index = write_index_html(items, run / "sheets", title="bench: 1000 chairs")
    figures["index_html_s"] = time.perf_counter() - started
    figures["index_html_kb"] = index.stat().st_size / 1024
    figures["total_s"] = time.perf_counter() - total
    figures["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return figures


def browser_timings(index: Path) -> dict[str, float]:
    """Load `index` in headless chromium; time the load, a filter change and a pick toggle."""
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                             headless=True, args=flags)
        page = browser.new_page()
        started = time.perf_counter()
        page.goto(index.as_uri())
        loaded = time.perf_counter() - started
        timings = page.evaluate(
            """() => {
                const t0 = performance.now();
                const select = document.querySelector('select[data-axis="seed"]');
                select.value = select.options[1].value; select.dispatchEvent(new Event("change"));
                const t1 = performance.now();
                document.querySelector("#cards .card:not([hidden]) .pick").click();
                return {filter_ms: t1 - t0, pick_ms: performance.now() - t1};
            }"""
        )
        browser.close()
    return {"load_s": loaded, **timings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--run", type=Path, help="run folder to build (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder")
    parser.add_argument("--browser", action="store_true", help="also time index.html in headless chromium")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0

    run = args.run or Path(tempfile.mkdtemp(prefix="imagegen-bench-sheet-"))
    try:
        if not (run / "thumbs").is_dir() or len(list((run / "thumbs").glob("*.jpg"))) != args.jobs:
            shutil.rmtree(run, ignore_errors=True)
            started = time.perf_counter()
            per_thumb = build_run(run, args.jobs)
            print(f"built {args.jobs} synthetic renders in {time.perf_counter() - started:.1f} s; "
                  f"make_thumbnail + save_thumbnail_atomic from 1024x1024: {per_thumb * 1000:.1f} ms each")
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(run)], check=True, capture_output=True, text=True
        )
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        browser = browser_timings(run / "sheets" / "index.html") if args.browser else None
    finally:
        if not args.keep and args.run is None:
            shutil.rmtree(run, ignore_errors=True)

    sheets = figures["plain_s"] + figures["by_prompt_s"] + figures["xy_lora_prompt_s"]
    print(f"{int(figures['jobs'])} jobs, 2 CPU cores")
    for label in ("plain", "by_prompt", "xy_lora_prompt"):
        print(f"  write_sheets {label:<15} {figures[f'{label}_s']:6.2f} s  {int(figures[f'{label}_pages'])} pages")
    print(f"  write_index_html             {figures['index_html_s']:6.2f} s  {figures['index_html_kb']:.0f} KiB")
    print(f"  all three layouts + index    {figures['total_s']:6.2f} s  (sheets alone {sheets:.2f} s)")
    print(f"  peak memory (max RSS)        {figures['max_rss_mb']:6.0f} MB")
    one_layout = max(figures["plain_s"], figures["by_prompt_s"], figures["xy_lora_prompt_s"]) + figures["index_html_s"]
    ok = one_layout < TARGET_SECONDS and figures["max_rss_mb"] < TARGET_RSS_MB
    print(f"target: one sheet run + index < {TARGET_SECONDS:.0f} s ({one_layout:.2f} s), "
          f"max RSS < {TARGET_RSS_MB:.0f} MB: {'met' if ok else 'MISSED'}")
    if browser is not None:
        fast = browser["load_s"] < 10 and browser["filter_ms"] < 500 and browser["pick_ms"] < 500
        print(f"index.html in chromium: load {browser['load_s']:.2f} s, filter {browser['filter_ms']:.0f} ms, "
              f"pick {browser['pick_ms']:.0f} ms (targets 10 s / 500 ms / 500 ms): {'met' if fast else 'MISSED'}")
        ok = ok and fast
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
