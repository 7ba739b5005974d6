"""Several render workers on one run (`--workers N --device cpu`, the CPU stand-in for `--gpus`):
the same pixels as one worker, nothing rendered twice, kill -9 and SIGTERM survived."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.errors import InputError
from imagegen.recipe import load_recipe
from imagegen.render import RenderOptions, render_recipe
from imagegen.render.workers import render_with_workers, worker_devices
from imagegen.store import RunStore

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
name: workers
model:
  checkpoint: builtin:tiny-sd15
prompts:
  - "a {{red|blue|green}} cup"
seeds: [{seeds}]
size: 64x64
steps: {steps}
batch_size: 1
output: run
"""


def write_recipe(tmp_path: Path, seeds: int = 2, steps: int = 2, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(RECIPE).format(seeds=", ".join(str(10 + i) for i in range(seeds)), steps=steps))
    return path


def images_of(run: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted((run / "images").glob("*.png")):
        with Image.open(p) as im:
            out[p.stem.split("-")[1]] = np.asarray(im.convert("RGB"))
    return out


def image_events(run: Path) -> Counter:
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return Counter(e["id"] for e in events if e["event"] == "image")


def one_worker_reference(recipe_path: Path, folder: Path) -> dict[str, np.ndarray]:
    recipe = load_recipe(recipe_path)
    with RunStore.open(folder) as store:
        render_recipe(recipe, store, options=RenderOptions(device="cpu", batch_size=1))
    return images_of(folder)


def test_worker_devices():
    assert worker_devices(workers=2) == ["cpu", "cpu"]
    assert worker_devices(workers=3, device="cpu") == ["cpu"] * 3
    with pytest.raises(InputError, match="give one"):
        worker_devices(workers=2, gpus="all")
    with pytest.raises(InputError, match="indices"):
        worker_devices(gpus="0,x")
    with pytest.raises(InputError, match="distinct"):
        worker_devices(gpus="1,1")
    with pytest.raises(InputError, match="does not go with it"):
        worker_devices(gpus="0", device="cpu")


def test_two_cpu_workers_render_the_same_pixels_as_one_once_each(tmp_path, one_thread):
    path = write_recipe(tmp_path)
    reference = one_worker_reference(path, tmp_path / "one")
    events: list[dict] = []
    with RunStore.open(tmp_path / "two") as store:
        summary = render_with_workers(load_recipe(path), store, ["cpu", "cpu"], options=RenderOptions(batch_size=1),
                                      on_event=events.append, lease=5.0)
        workers = store.status()["workers"]
        assert store.counts()["done"] == 6
    assert (summary.rendered, summary.failed, summary.left) == (6, 0, 0)
    got = images_of(tmp_path / "two")
    assert got.keys() == reference.keys()
    for job_id, pixels in reference.items():  # batch 1 in both, one code path: exact
        np.testing.assert_array_equal(got[job_id], pixels)
    assert set(image_events(tmp_path / "two").values()) == {1}
    assert [w["name"] for w in workers] == ["w0", "w1"]
    assert sum(w["rendered"] for w in workers) == 6 and all(w["state"] == "stopped" for w in workers)
    assert [e["event"] for e in events].count("loaded") == 1 and events[-1]["event"] == "finish"
    with RunStore.open(tmp_path / "two") as store:  # the queue is gone with the run
        assert store.queued() == {"waiting": 0, "claimed": 0}


def _start(recipe: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "imagegen", "render", str(recipe), "--workers", "2", "--device", "cpu",
                             "--json", "--no-sheet", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=recipe.parent)


def _events_until(proc: subprocess.Popen, done: callable, timeout: float = 240) -> list[dict]:
    events, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        events.append(json.loads(line))
        if done(events) or time.monotonic() > deadline:
            break
    return events


@pytest.mark.slow
def test_kill_9_of_a_worker_mid_run_completes_without_duplicates(tmp_path):
    path = write_recipe(tmp_path, seeds=8, steps=4)  # 24 jobs
    pids: dict[str, int] = {}

    def first_image_of_w1(events):
        for e in events:
            if e["event"] in ("loaded", "worker_loaded"):
                pids[e["worker"]] = e["pid"]
        return any(e["event"] == "image" and e.get("worker") == "w1" for e in events)

    proc = _start(path)
    events = _events_until(proc, first_image_of_w1)
    os.kill(pids["w1"], signal.SIGKILL)
    rest, stderr = proc.communicate(timeout=240)
    events += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 0, stderr
    lost = [e for e in events if e["event"] == "worker_lost"]
    assert [e["worker"] for e in lost] == ["w1"]
    finish = events[-1]
    assert finish["event"] == "finish" and finish["left"] == 0 and finish["lost"] == ["w1"]
    run = tmp_path / "run"
    counts = image_events(run)
    assert len(counts) == 24 and set(counts.values()) == {1}  # every job once
    with RunStore.open(run) as store:
        assert store.counts()["done"] == 24
    reference = one_worker_reference(path, tmp_path / "one")
    got = images_of(run)
    assert got.keys() == reference.keys()
    for job_id, pixels in reference.items():
        np.testing.assert_array_equal(got[job_id], pixels)


def test_sigterm_stops_every_worker_cleanly_and_the_run_resumes(tmp_path):
    path = write_recipe(tmp_path, seeds=6, steps=3)  # 18 jobs
    proc = _start(path)
    events = _events_until(proc, lambda ev: any(e["event"] == "image" for e in ev))
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=120)
    events += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 143, stderr
    assert "to resume" in stderr
    finish = events[-1]
    assert finish["event"] == "finish" and finish["interrupted"] == "SIGTERM" and finish["lost"] == []
    exits = [e for e in events if e["event"] == "worker_exit"]
    assert sorted(e["worker"] for e in exits) == ["w0", "w1"] and not any(e.get("error") for e in exits)
    run = tmp_path / "run"
    with RunStore.open(run) as store:
        first = store.counts()["done"]
        assert first == finish["rendered"] and finish["left"] == 18 - first
        assert store.queued() == {"waiting": 0, "claimed": 0}
    proc = _start(path)
    out, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert json.loads(out.splitlines()[-1])["rendered"] == 18 - first
    counts = image_events(run)
    assert len(counts) == 18 and set(counts.values()) == {1}


def test_budgets_and_compile_are_refused_with_workers_not_ignored(tmp_path, capsys):
    from imagegen.cli import run_app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: w\nmodel:\n  checkpoint: builtin:tiny-sd15\nprompt: a cup\nsize: 64x64\nsteps: 2\noutput: run\n")
    assert run_app(["render", str(recipe), "--workers", "2", "--device", "cpu", "--max-hours", "1"]) == 2
    assert "not supported with `--workers`/`--gpus` yet" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
