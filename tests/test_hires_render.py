"""`hires:` end to end: render, A1111 keys read back, both passes in the JSON, keep_first,
reproduce, and resume after kill -9 in the middle of a hires batch."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.cli import run_app
from imagegen.metadata import parse_hires, parse_parameters, read_png_text, read_provenance
from imagegen.plan import plan
from imagegen.recipe import load_recipe
from imagegen.reproduce import reproduce_image

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
name: hires
model:
  checkpoint: builtin:{model}
prompt: "a {{red|blue}} cube"
negative: blurry
seeds: [5, 6]
size: 64x64
steps: 3
guidance: 5
scheduler: Euler a
batch_size: {batch}
output: run
hires:
{hires}
"""


def write(tmp_path: Path, hires: str, model: str = "tiny-sd15", batch: int = 4) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE).format(model=model, batch=batch, hires=textwrap.indent(textwrap.dedent(hires).strip(), "  ")))
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_render_hires_metadata_keep_first_and_reproduce(tmp_path, model):
    path = write(tmp_path, """
        scale: 1.5
        denoise: [0.4, 0.6]
        steps: 2
        scheduler: DPM++ 2M Karras
        keep_first: true
    """, model)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    run = tmp_path / "run"
    jobs = plan(load_recipe(path))
    images = sorted((run / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{j.index:04d}-{j.id}.png" for j in jobs] and len(jobs) == 8
    with Image.open(images[0]) as im:
        assert im.size == (96, 96)
    # the first pass beside the final image, at the model's size, with first-pass infotext
    firsts = sorted((run / "first").glob("*.png"))
    assert [p.name for p in firsts] == [p.name for p in images]
    with Image.open(firsts[0]) as im:
        assert im.size == (64, 64)
    assert "Hires" not in read_png_text(firsts[0])["parameters"]
    # A1111 keys, read back by our parser
    job = jobs[5]
    fields = parse_parameters(read_png_text(images[5])["parameters"])
    assert fields["Size"] == "64x64" and fields["Steps"] == "3" and fields["Sampler"] == "Euler a"
    assert (fields["Denoising strength"], fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"]) == \
        (f"{job.hires.denoise:g}", "1.5", "2", "Latent")
    assert fields["Hires sampler"] == "DPM++ 2M" and fields["Hires schedule type"] == "Karras"
    assert parse_hires(fields) == {"scale": 1.5, "size": None, "steps": 2, "denoise": job.hires.denoise,
                                   "upscaler": "Latent", "scheduler": "DPM++ 2M Karras"}
    # both passes in the JSON
    prov = read_provenance(images[5])
    assert prov["content"]["hires"]["size"] == [96, 96] and dict(prov["axes"])["denoise"] == f"{job.hires.denoise:g}"
    first, second = prov["passes"]
    assert first == {"pass": "txt2img", "size": [64, 64], "steps": 3, "scheduler": "Euler a"}
    assert second["size"] == [96, 96] and second["steps"] == 2 and second["schedule_steps"] == int(2 / job.hires.denoise)
    from imagegen.engine.hires import img2img_schedule

    assert (second["schedule_steps"], second["strength"]) == img2img_schedule(2, job.hires.denoise)
    assert second["scheduler_config"]["_class_name"] == "DPMSolverMultistepScheduler"
    # sheets label the hires axes: they come through the job's axes, and can lay out a grid
    from imagegen.sheets.items import varying_axes
    from imagegen.sheets.run import sheet_items, write_run_sheets
    from imagegen.store import RunStore

    with RunStore.open(run) as store:
        items = sheet_items(store)
        assert "denoise" in varying_axes(items) and items[0].axes["hires"] == "x1.5 96x96"
        pages, _ = write_run_sheets(store, x="denoise", y="seed")
        assert pages
    # import gives back the recipe of the very job (same id)
    from imagegen.importer import import_image

    again = tmp_path / "again.yaml"
    again.write_text(import_image(images[5]).text)
    [same] = plan(load_recipe(again))
    assert same.id == job.id and same.hires == job.hires.__class__(**{**job.hires.__dict__, "keep_first": False})
    # reproduce renders both passes again
    rep = reproduce_image(images[5], device="cpu")
    assert rep.max_diff <= 1


def test_width_target_lanczos_infotext(tmp_path):
    path = write(tmp_path, """
        width: 80
        upscaler: lanczos
        denoise: 0.5
    """, batch=2)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    images = sorted((tmp_path / "run" / "images").glob("*.png"))
    assert len(images) == 4 and not (tmp_path / "run" / "first").exists()
    with Image.open(images[0]) as im:
        assert im.size == (80, 80)
    fields = parse_parameters(read_png_text(images[0])["parameters"])
    assert fields["Hires resize"] == "80x80" and fields["Hires upscaler"] == "Lanczos" and fields["Hires steps"] == "3"
    assert "Hires sampler" not in fields and "Hires upscale" not in fields
    assert parse_hires(fields)["size"] == [80, 80]


def test_kept_first_passes_follow_index_changes(tmp_path):
    path = write(tmp_path, """
        scale: 1.25
        upscaler: latent-nearest
        denoise: 0.5
        keep_first: true
    """, batch=2)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    before = {p.name.split("-")[1]: p for p in (tmp_path / "run" / "first").glob("*.png")}
    path.write_text(path.read_text().replace("seeds: [5, 6]", "seeds: [4, 5, 6]"))  # new jobs before the old ones
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    jobs = plan(load_recipe(path))
    assert sorted(p.name for p in (tmp_path / "run" / "first").glob("*.png")) == [f"{j.index:04d}-{j.id}.png" for j in jobs]
    assert len(before) == 4 and len(jobs) == 6


@pytest.mark.slow
def test_kill_9_in_a_hires_batch_then_resume(tmp_path):
    """Killed at random moments during hires batches of 2; the resumed run equals a clean one
    within 1/255 (batches may be composed differently after a resume)."""
    hires = """
        scale: 1.5
        denoise: 0.5
        upscaler: lanczos
        keep_first: true
    """
    ref_dir, work = tmp_path / "ref", tmp_path / "work"
    ref_dir.mkdir()
    work.mkdir()
    ref, recipe = write(ref_dir, hires, batch=2), write(work, hires, batch=2)
    # 16 jobs, 8 batches of 2: enough work left for the kills even on an idle machine where a tiny batch
    # takes a fraction of a second (with 4 batches the run could finish before a second kill).
    text = recipe.read_text().replace("seeds: [5, 6]", f"seeds: {list(range(5, 13))}")
    recipe.write_text(text)
    ref.write_text(text)
    assert subprocess.run([sys.executable, "-m", "imagegen", "render", str(ref), "--no-sheet"], cwd=ref_dir,
                          capture_output=True).returncode == 0
    run = work / "run"
    rng = random.Random(16)

    def logged() -> int:
        log = run / "log.jsonl"
        return sum('"event": "image"' in ln for ln in log.read_text().splitlines()) if log.exists() else 0

    kills = 0
    for _ in range(6):
        if kills == 3:
            break
        proc = subprocess.Popen([sys.executable, "-m", "imagegen", "render", str(recipe), "--no-sheet"], cwd=work,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target, end = logged() + 1, time.monotonic() + 600
        while proc.poll() is None and logged() < target and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # in the middle of the next batch: first pass, hires pass or writing
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2
    final = subprocess.run([sys.executable, "-m", "imagegen", "render", str(recipe), "--no-sheet"], cwd=work,
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert not list(run.rglob(".tmp-*"))
    got, want = sorted((run / "images").glob("*.png")), sorted((ref_dir / "run" / "images").glob("*.png"))
    assert [p.name for p in got] == [p.name for p in want] and len(got) == 16
    assert sorted(p.name for p in (run / "first").glob("*.png")) == [p.name for p in got]
    for a, b in zip(got, want):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1, a.name
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rendered = [e["id"] for e in events if e["event"] == "image"]
    assert len(rendered) == len(set(rendered))


def test_a_finished_hires_image_is_trusted_on_the_next_start(tmp_path, capsys):
    # The start-up damage check compares each PNG's declared size with the job's image size:
    # for a hires job that is the second pass's size, so a rerun renders nothing again.
    path = write(tmp_path, """
        scale: 1.5
        denoise: 0.5
        upscaler: lanczos
    """)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    capsys.readouterr()
    assert run_app(["render", str(path), "--no-sheet", "--json"]) == 0
    start = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if '"start"' in line)
    assert start["to_render"] == 0 and start["reset_missing"] == 0
