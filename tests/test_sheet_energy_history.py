"""Energy per contact-sheet page (only when measured), and the render-history file under a lock
so that renders finishing at once in several processes keep each other's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from PIL import Image

from imagegen.history import RateLog, history_file
from imagegen.sheets import drawing
from imagegen.sheets.items import SheetItem, energy_note
from imagegen.sheets.run import sheet_items, write_run_sheets
from imagegen.store import RunStore, image_name, thumb_name

ROOT = Path(__file__).resolve().parents[1]


def _item(i: int, joules: float | None) -> SheetItem:
    return SheetItem(i, f"job{i}", Path("t.jpg"), Path("i.png"), {}, joules=joules)


def test_energy_note():
    assert energy_note([_item(1, None), _item(2, None)]) is None  # never a guess
    assert energy_note([_item(1, 1800.0), _item(2, 5400.0)]) == "2 Wh"
    assert energy_note([_item(1, 1.8), _item(2, 1.8)]) == "1 mWh"
    assert energy_note([_item(1, 3600.0), _item(2, None), _item(3, 3600.0)]) == "2 Wh (2 of 3 images measured)"


def _run(folder: Path, joules: list[float | None]) -> Path:
    with RunStore.open(folder) as store:
        store.set_meta("recipe_name", "energy")
        jobs = [{"id": f"{i:012x}", "index": i, "axes": {"seed": str(i)}} for i in range(1, len(joules) + 1)]
        store.sync_plan(jobs)
        for job, j in zip(jobs, joules):
            picture = Image.new("RGB", (32, 32), (job["index"] * 40 % 256, 80, 160))
            image = store.images / image_name(job["index"], job["id"])
            thumb = store.thumbs / thumb_name(job["index"], job["id"])
            picture.save(image)
            picture.save(thumb)
            store.mark_done(job["id"], file=image, sha256="0" * 64, thumb=thumb, seconds=0.5, joules=j)
    return folder


def _header_lines(monkeypatch, folder: Path, per_page: int) -> list[str]:
    shown: list[str] = []
    real = drawing._ellipsize
    monkeypatch.setattr(drawing, "_ellipsize", lambda text, size, width: shown.append(text) or real(text, size, width))
    with RunStore.open(folder) as store:
        write_run_sheets(store, max_per_page=per_page)
    return [t for t in shown if "this page:" in t]


def test_sheet_pages_show_measured_energy(tmp_path, monkeypatch):
    folder = _run(tmp_path / "run", [360.0, 720.0, 1080.0, None])
    with RunStore.open(folder) as store:
        assert [it.joules for it in sheet_items(store)] == [360.0, 720.0, 1080.0, None]
    lines = _header_lines(monkeypatch, folder, per_page=2)
    assert len(lines) == 2
    assert lines[0].endswith("this page: 2 images, #1 to #2, 0.3 Wh")
    assert lines[1].endswith("this page: 2 images, #3 to #4, 0.3 Wh (1 of 2 images measured)")
    unmeasured = _run(tmp_path / "cpu", [None, None])
    assert _header_lines(monkeypatch, unmeasured, per_page=10)[0].endswith("#1 to #2")  # nothing said


WRITER = textwrap.dedent("""
    import sys
    from imagegen.history import RateLog
    me, rounds = sys.argv[1], int(sys.argv[2])
    for r in range(rounds):
        log = RateLog("cpu")
        log.add(f"model-{me}-{r}", 64, 64, 4, 2, 1.0, None)
        log.save()
""")


def test_history_keeps_every_process_s_entries(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMAGEGEN_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(p), "25"], env=env) for p in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    rates = json.loads((tmp_path / "cache" / "render-history.json").read_text())["rates"]
    models = {json.loads(k)[1] for k in rates}
    assert models == {f"model-{p}-{r}" for p in range(4) for r in range(25)}  # 100 saves, none lost


def test_history_without_a_writable_cache_is_ignored(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        log = RateLog("cpu", path=ro / "sub" / "render-history.json")
        log.add("m", 64, 64, 4, 1, 1.0, None)
        log.save()  # advisory: no lock, no file, no error
        assert not (ro / "sub").exists() or os.geteuid() == 0
    finally:
        ro.chmod(0o700)
    assert history_file().name == "render-history.json"
