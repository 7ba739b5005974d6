"""Energy per image through the render (manifest, provenance, status, summary) and the time and
energy budgets, on the tiny real model. A test meter stands in for NVML/RAPL (absent here)."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from imagegen import energy
from imagegen.cli import run_app
from imagegen.errors import InputError
from imagegen.metadata import read_provenance
from imagegen.recipe import load_recipe
from imagegen.render import RenderOptions, render_recipe
from imagegen.render.budget import Budget, BudgetCheck, parse_until
from imagegen.store import RunStore
from test_render import write_recipe

WATTS = 100.0


@pytest.fixture
def hundred_watts(monkeypatch):
    """A meter that counts 100 W of wall time: the render path reads it like NVML's counter."""
    meter = energy.Meter("test", lambda: time.monotonic() * WATTS)
    monkeypatch.setattr(energy, "meter_for", lambda device: meter)
    return meter


def test_measured_joules_reach_manifest_provenance_status_and_summary(tmp_path, hundred_watts, capsys):
    path = write_recipe(tmp_path)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    finish = capsys.readouterr().err.splitlines()[-1]
    assert "Wh/image" in finish and "kWh" in finish
    with RunStore.open(tmp_path / "run", create=False, lock=False) as store:
        rows = store.rows()
        st = store.status()
    for r in rows:
        prov = read_provenance(tmp_path / "run" / r.file)
        assert prov["energy"]["meter"] == "test"
        joules = prov["energy"]["joules"]
        assert joules == pytest.approx(WATTS * prov["seconds"], rel=0.05)  # the batch's energy, shared per image
    assert st["energy"]["measured_images"] == 6
    assert st["energy"]["kwh"] == pytest.approx(st["energy"]["wh_per_image"] * 6 / 1000)
    assert run_app(["status", str(tmp_path / "run")]) == 0
    assert "Wh/image" in capsys.readouterr().out


def test_unmeasured_energy_says_so(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert run_app(["render", str(path), "--no-sheet", "--limit", "1"]) == 0
    assert "energy not measured" in capsys.readouterr().err.splitlines()[-1]
    image = next((tmp_path / "run" / "images").glob("*.png"))
    assert read_provenance(image)["energy"] == {"joules": "not measured", "meter": "none"}
    assert run_app(["status", str(tmp_path / "run")]) == 0
    assert "energy not measured" in capsys.readouterr().out
    # --max-kwh cannot be kept without a counter: refused before anything starts
    assert run_app(["render", str(path), "--max-kwh", "1"]) == 2
    assert "not measured" in capsys.readouterr().err


def test_budget_arithmetic():
    now = datetime(2026, 3, 1, 22, 30)
    assert datetime.fromtimestamp(parse_until("07:00", now)) == datetime(2026, 3, 2, 7, 0)
    assert datetime.fromtimestamp(parse_until("23:15", now)) == datetime(2026, 3, 1, 23, 15)
    with pytest.raises(InputError, match="HH:MM"):
        parse_until("7am", now)
    with pytest.raises(InputError, match="--max-hours"):
        Budget.from_options(max_hours=0)
    b = Budget.from_options(until="07:00", max_hours=2, now=now.timestamp())
    assert b.deadline == now.timestamp() + 7200  # the earlier of the two
    check = BudgetCheck(Budget(deadline=1000.0, max_joules=10_000.0))
    assert check.stop_reason(4, now=999.0) is None  # nothing to estimate from: the first batch runs
    check.tally.add(4, 40.0, 4000.0)  # 10 s and 1000 J per image
    assert check.stop_reason(4, now=950.0) is None  # ends at 990
    assert "would end after" in check.stop_reason(4, now=970.0)
    assert "would pass" in check.stop_reason(8, now=0.0)  # 4000 + 8000 J > 10000 J
    assert check.stop_reason(6, now=0.0) is None
    assert check.budget.after(12_000.0).max_joules == 0.0
    assert "no energy left" in BudgetCheck(check.budget.after(12_000.0)).stop_reason(1, now=0.0)


def test_deadline_stops_before_the_next_batch_and_resumes(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    budget = Budget()
    from imagegen.engine import open_engine

    def opener(*a, **k):
        eng = open_engine(*a, **k)
        eng.pipeline.unet.register_forward_pre_hook(lambda m, a: time.sleep(0.2))  # >= 0.6 s a batch
        budget.deadline = time.time() + 0.3  # the first batch starts, its rate says the second would not fit
        return eng

    store = RunStore.open(tmp_path / "run")
    try:
        s = render_recipe(recipe, store, open_engine=opener, options=RenderOptions(batch_size=2, budget=budget))
        assert s.rendered == 2 and s.left == 4 and s.failed == 0 and s.interrupted is None
        assert s.budget_reached.startswith("budget reached")
        again = render_recipe(recipe, store, options=RenderOptions(batch_size=2))
        assert again.rendered == 4 and store.counts()["done"] == 6
    finally:
        store.close()


def test_energy_budget_stops_the_queue_with_exit_0(tmp_path, hundred_watts, capsys):
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("batch_size: 4", "batch_size: 2"))
    # 100 W for the first batch (well over 0.36 J): the second would pass 0.1 mWh
    assert run_app(["render", str(path), "--no-sheet", "--max-kwh", "0.0000001"]) == 0
    err = capsys.readouterr().err
    assert "budget reached" in err and "to resume: imagegen render" in err and "--max-kwh" in err
    with RunStore.open(tmp_path / "run", create=False, lock=False) as store:
        assert store.counts()["done"] == 2 and store.counts()["pending"] == 4


def test_plan_estimates_from_this_machines_history(tmp_path, monkeypatch, hundred_watts, capsys):
    from imagegen import history

    path = write_recipe(tmp_path)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    rates = json.loads(history.history_file().read_text())["rates"]
    key = [k for k in rates if json.loads(k)[1:] == ["builtin:tiny-sd15", 64, 64, 3, "cpu"]]
    assert key and rates[key[0]]["images"] >= 6 and rates[key[0]]["joule_images"] >= 6
    capsys.readouterr()
    assert run_app(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "estimate: ~" in out and "kWh" in out and "from earlier runs on this machine (cpu)" in out
    # another machine's cache (or none): says there is no history
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "empty-cache"))
    assert run_app(["plan", str(path)]) == 0
    assert "no render history on this machine for builtin:tiny-sd15 64x64 3 steps" in capsys.readouterr().out


def test_history_merges_and_fades(tmp_path):
    from imagegen.history import KEEP_IMAGES, RateLog, estimate
    from imagegen.plan import plan

    jobs = plan(load_recipe(write_recipe(tmp_path)))
    f = tmp_path / "h.json"
    log = RateLog("cuda", f)
    log.add("builtin:tiny-sd15", 64, 64, 3, 4, 2.0, None)
    log.save()
    e = estimate(jobs, f)
    assert (e.known, e.jobs, e.joules) == (6, 6, None) and e.seconds == pytest.approx(3.0)
    assert "energy not measured" in e.describe()
    log.add("builtin:tiny-sd15", 64, 64, 3, KEEP_IMAGES * 2, 1000.0 * KEEP_IMAGES, 10.0)
    log.save()
    data = json.loads(f.read_text())["rates"]
    (entry,) = data.values()
    assert entry["images"] <= KEEP_IMAGES
    f.write_text("not json")
    assert estimate(jobs, f).known == 0  # an unreadable file is no history, never an error
