"""End to end: `imagegen render` on the tiny built-in models, the run folder, metadata, resume."""

from __future__ import annotations

import errno
import json
import sqlite3
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.cli import run_app
from imagegen.metadata import parse_parameters, read_png_text, read_provenance
from imagegen.plan import plan
from imagegen.recipe import load_recipe
from imagegen.render import RenderOptions, render_recipe
from imagegen.store import RunStore

RECIPE = """
name: small
model:
  checkpoint: builtin:{model}
prompts:
  - "a {{red|blue}} cup"
negative: ugly, blurry
seeds: [11, 12, 13]
size: 64x64
steps: 3
guidance: 5
scheduler: Euler a
batch_size: 4
output: run
"""


def write_recipe(tmp_path: Path, model: str = "tiny-sd15", extra: str = "", text: str | None = None) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text or RECIPE).format(model=model) + extra)
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_render_writes_images_thumbs_metadata_and_resumes(tmp_path, capsys, model):
    path = write_recipe(tmp_path, model)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    run = tmp_path / "run"
    images = sorted((run / "images").glob("*.png"))
    jobs = plan(load_recipe(path))
    assert [p.name for p in images] == [f"{j.index:04d}-{j.id}.png" for j in jobs]
    assert len(list((run / "thumbs").glob("*.jpg"))) == 6
    assert (run / "recipe.yaml").read_text() == path.read_text()
    # A1111 parameters round-trip to the job, and JSON provenance names it
    job = jobs[4]
    text = read_png_text(images[4])
    params = parse_parameters(text["parameters"])
    assert params["prompt"] == job.prompt and params["negative"] == "ugly, blurry"
    assert params["Seed"] == str(job.seed) and params["Steps"] == "3" and params["Size"] == "64x64"
    assert params["Sampler"] == "Euler a" and params["scheduler"] == "Euler a" and params["CFG scale"] == "5"
    assert params["Version"].startswith("imagegen ")
    prov = read_provenance(images[4])
    assert prov["id"] == job.id and prov["index"] == 5 and prov["recipe"]["name"] == "small"
    assert prov["recipe"]["text"] == path.read_text()  # the whole recipe travels with every image
    assert prov["content"]["seed"] == job.seed and prov["scheduler_config"]["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert prov["versions"]["diffusers"] and prov["device"] == "cpu" and prov["dtype"] == "fp32"
    # the manifest agrees with the disk
    with sqlite3.connect(run / "manifest.sqlite") as db:
        rows = db.execute("SELECT idx, status, file, sha256 FROM jobs ORDER BY idx").fetchall()
    assert [r[1] for r in rows] == ["done"] * 6
    import hashlib

    assert rows[0][3] == hashlib.sha256(images[0].read_bytes()).hexdigest()
    # rerun: nothing rendered twice
    mtimes = [p.stat().st_mtime_ns for p in images]
    capsys.readouterr()
    assert run_app(["render", str(path), "--no-sheet", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["event"] == "start" and events[0]["to_render"] == 0
    assert [p.stat().st_mtime_ns for p in images] == mtimes
    assert not list(run.rglob(".tmp-*"))


def test_batch_size_does_not_change_pixels(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pa = write_recipe(a)
    pb = write_recipe(b)
    assert run_app(["render", str(pa), "--no-sheet", "--batch-size", "1"]) == 0
    assert run_app(["render", str(pb), "--no-sheet", "--batch-size", "6"]) == 0
    for ia, ib in zip(sorted((a / "run" / "images").glob("*.png")), sorted((b / "run" / "images").glob("*.png"))):
        assert ia.name == ib.name
        assert np.abs(pixels(ia) - pixels(ib)).max() <= 1


def test_edit_recipe_keeps_finished_jobs_and_reports_orphans(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    run = tmp_path / "run"
    before = {p.stem.split("-")[1]: p.stat().st_mtime_ns for p in (run / "images").glob("*.png")}
    # drop seed 11, add seed 14: four jobs kept (renamed to their new index), two new, two orphaned
    path.write_text(path.read_text().replace("seeds: [11, 12, 13]", "seeds: [12, 13, 14]"))
    capsys.readouterr()
    assert run_app(["render", str(path), "--no-sheet", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    start = events[0]
    assert (start["new"], start["orphaned"], start["to_render"]) == (2, 2, 2)
    finish = events[-1]
    assert finish["rendered"] == 2
    jobs = plan(load_recipe(path))
    names = {p.name for p in (run / "images").glob("*.png")}
    assert {f"{j.index:04d}-{j.id}.png" for j in jobs} <= names
    assert len(names) == 8  # the two orphans are kept, never deleted
    kept = {j.id for j in jobs} & set(before)
    assert len(kept) == 4
    for p in (run / "images").glob("*.png"):
        jid = p.stem.split("-")[1]
        if jid in kept:
            assert p.stat().st_mtime_ns == before[jid]  # not re-rendered
    assert (run / "recipe-history").is_dir()
    capsys.readouterr()
    assert run_app(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "6/6 done" in out and "2 orphaned" in out and out.count("orphaned (no longer in the recipe, kept)") == 2


def test_reconcile_after_crash_state(tmp_path):
    path = write_recipe(tmp_path)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    run = tmp_path / "run"
    images = sorted((run / "images").glob("*.png"))
    # a crash leaves: a half-written temp file, a finished image the manifest never heard of,
    # and a manifest row whose image was deleted by hand
    (run / "images" / ".tmp-0001-abc.png.999").write_bytes(b"\x89PNG partial")
    with sqlite3.connect(run / "manifest.sqlite") as db:
        db.execute("UPDATE jobs SET status = 'pending', file = NULL WHERE idx = 2")
    images[2].unlink()
    recipe = load_recipe(path)
    events = []
    store = RunStore.open(run)
    try:
        summary = render_recipe(recipe, store, on_event=events.append)
    finally:
        store.close()
    start = events[0]
    assert (start["temp_removed"], start["adopted"], start["reset_missing"], start["to_render"]) == (1, 1, 1, 1)
    assert summary.rendered == 1 and not list(run.rglob(".tmp-*"))
    assert len(list((run / "images").glob("*.png"))) == 6


def test_second_render_on_same_folder_is_refused_with_pid(tmp_path, capsys):
    path = write_recipe(tmp_path)
    store = RunStore.open(tmp_path / "run")
    try:
        assert run_app(["render", str(path), "--no-sheet"]) == 2
        msg = capsys.readouterr().err
        import os

        assert f"PID {os.getpid()}" in msg and "--wait" in msg
    finally:
        store.close()


def test_failures_are_recorded_and_retried(tmp_path, capsys):
    """A pipeline exception and a NaN image fail their jobs; the batch goes on."""
    from imagegen.engine import GenResult, open_engine

    class Flaky:
        def __init__(self, real):
            self.real = real
            self.broken = True

        def __getattr__(self, name):
            return getattr(self.real, name)

        def generate(self, requests):
            if self.broken and any(r.seed == 12 for r in requests):
                raise RuntimeError("boom in the pipeline")
            results = self.real.generate(requests)
            if self.broken:
                results = [GenResult(None, "NaN in output") if r.seed == 13 else res for r, res in zip(requests, results)]
            return results

    engines = []

    def opener(*a, **k):
        engines.append(Flaky(open_engine(*a, **k)))
        return engines[-1]

    path = write_recipe(tmp_path)
    recipe = load_recipe(path)
    store = RunStore.open(tmp_path / "run")
    try:
        s = render_recipe(recipe, store, open_engine=opener, options=RenderOptions(batch_size=1))
        assert (s.rendered, s.failed) == (2, 4)
        st = store.status()
        assert st["failed"] == 4 and "NaN" in st["last_error"]["error"] or "boom" in st["last_error"]["error"]
        engines.clear()
        again = render_recipe(recipe, store, open_engine=opener)
        assert again.rendered == 0 and store.counts()["failed"] == 4  # failed jobs wait for --retry-failed

        def fixed_opener(*a, **k):
            e = opener(*a, **k)
            e.broken = False
            return e

        retry = render_recipe(recipe, store, open_engine=fixed_opener, options=RenderOptions(retry_failed=True))
        assert retry.rendered == 4 and store.counts()["done"] == 6
    finally:
        store.close()


def test_cuda_oom_halves_the_batch(tmp_path):
    from imagegen.engine import EngineOOM, open_engine

    class Small:
        def __init__(self, real):
            self.real = real
            self.sizes = []

        def __getattr__(self, name):
            return getattr(self.real, name)

        def generate(self, requests):
            self.sizes.append(len(requests))
            if len(requests) > 1:
                raise EngineOOM("CUDA out of memory (test)")
            return self.real.generate(requests)

    holder = []
    recipe = load_recipe(write_recipe(tmp_path))
    events = []
    store = RunStore.open(tmp_path / "run")
    try:
        s = render_recipe(recipe, store, on_event=events.append,
                          open_engine=lambda *a, **k: holder.append(Small(open_engine(*a, **k))) or holder[-1])
    finally:
        store.close()
    assert s.rendered == 6 and s.failed == 0 and s.batch_size == 1
    assert [e["batch_size"] for e in events if e["event"] == "oom"] == [2, 1]
    assert holder[0].sizes[:3] == [4, 2, 1]
    from imagegen.cli.render import Reporter

    shown = []
    reporter = Reporter("plain")
    reporter.line = shown.append
    for e in events:
        reporter(e)
    assert sum("out of memory" in line for line in shown) == 2  # said once, and in the summary
    assert "batch size ended at 1" in shown[-1]


def test_disk_full_stops_cleanly_and_resumes(tmp_path, monkeypatch, capsys):
    import imagegen.render.writer as R

    real = R.write_bytes_atomic
    calls = {"n": 0}

    def full_after_two(path, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(R, "write_bytes_atomic", full_after_two)
    path = write_recipe(tmp_path)
    code = run_app(["render", str(path), "--no-sheet"])
    err = capsys.readouterr().err
    assert code == 1 and "disk full" in err and "run the same command again to resume" in err
    run = tmp_path / "run"
    assert len(list((run / "images").glob("*.png"))) == 2 and not list(run.rglob(".tmp-*"))
    monkeypatch.setattr(R, "write_bytes_atomic", real)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    assert len(list((run / "images").glob("*.png"))) == 6


def test_dry_run_and_limit(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert run_app(["render", str(path), "--dry-run"]) == 0
    assert "would render 6" in capsys.readouterr().out and not (tmp_path / "run").exists()
    assert run_app(["render", str(path), "--limit", "2", "--no-sheet"]) == 0
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 2
    assert run_app(["render", str(path), "--dry-run"]) == 0
    assert "2 done" in capsys.readouterr().out


def test_queue_of_recipes_goes_on_past_an_invalid_one(tmp_path, capsys):
    good = write_recipe(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: {checkpoint: builtin:tiny-sd15}\nprompt: x\nsteps: 0\n")
    assert run_app(["render", str(bad), str(good), "--no-sheet"]) == 2
    assert "bad.yaml:4:8" in capsys.readouterr().err
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 6
    assert run_app(["render", str(bad), str(good), "--no-sheet", "--fail-fast", "--output", "x"]) == 2


def test_reproduce_command(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    image = sorted((tmp_path / "run" / "images").glob("*.png"))[3]
    capsys.readouterr()
    assert run_app(["reproduce", str(image)]) == 0
    assert ": match: max pixel difference" in capsys.readouterr().out
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert run_app(["reproduce", str(plain)]) == 2


def test_lora_sweep_through_render_weight_zero_equals_no_lora(tmp_path, capsys):
    from engine_fixtures import make_tiny_lora

    make_tiny_lora(tmp_path / "style.safetensors", "sd15", seed=3)
    text = RECIPE.replace("seeds: [11, 12, 13]", "seeds: [11]")
    path = write_recipe(tmp_path, text=text, extra="loras:\n  - {path: style.safetensors, weight: [0.0, 0.9]}\n")
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    images = sorted((tmp_path / "run" / "images").glob("*.png"))
    assert len(images) == 4  # 2 weights x 2 prompts
    params = parse_parameters(read_png_text(images[2])["parameters"])
    assert params["loras"] == [("style", 0.9)] and params["Lora hashes"].startswith("style: ")
    # the same jobs without the LoRA
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    assert run_app(["render", str(write_recipe(plain_dir, text=RECIPE.replace("seeds: [11, 12, 13]", "seeds: [11]"))), "--no-sheet"]) == 0
    plain = sorted((plain_dir / "run" / "images").glob("*.png"))
    assert np.abs(pixels(images[0]) - pixels(plain[0])).max() <= 1  # weight 0
    assert np.abs(pixels(images[2]) - pixels(plain[0])).max() > 8  # weight 0.9 changes it


def test_lora_for_the_wrong_family_stops_before_rendering(tmp_path, capsys):
    from engine_fixtures import make_tiny_lora

    make_tiny_lora(tmp_path / "xl.safetensors", "sdxl")
    path = write_recipe(tmp_path, extra="loras:\n  - {path: xl.safetensors, weight: 1}\n")
    assert run_app(["render", str(path), "--no-sheet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}:16:12: LoRA ") and "xl.safetensors is for sdxl" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "run" / "images").glob("*.png"))


def test_single_file_checkpoint_renders_like_the_folder(tmp_path):
    from engine_fixtures import make_single_file, tiny_folder

    ckpt = make_single_file(tmp_path / "tiny.safetensors", "sd15")
    recipe = load_recipe(write_recipe(tmp_path, text=RECIPE.replace("builtin:{model}", "tiny.safetensors").replace("seeds: [11, 12, 13]", "seeds: [5]")))
    folder = tiny_folder("sd15")
    from imagegen.engine import open_engine

    store = RunStore.open(tmp_path / "run")
    try:
        s = render_recipe(recipe, store, open_engine=lambda *a, **k: open_engine(*a, _config_dir=folder, **k))
    finally:
        store.close()
    assert s.rendered == 2
    image = sorted((tmp_path / "run" / "images").glob("*.png"))[0]
    params = parse_parameters(read_png_text(image)["parameters"])
    from imagegen.metadata import sha256_file

    assert params["Model"] == "tiny" and params["Model hash"] == sha256_file(ckpt)[:10]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = write_recipe(ref_dir, text=RECIPE.replace("seeds: [11, 12, 13]", "seeds: [5]"))
    assert run_app(["render", str(ref), "--no-sheet"]) == 0
    assert np.abs(pixels(image) - pixels(sorted((ref_dir / "run" / "images").glob("*.png"))[0])).max() <= 1


def test_render_with_the_network_blocked(tmp_path, monkeypatch):
    """Nothing in validate -> load -> render -> sheets may open a connection."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    path = write_recipe(tmp_path, model="tiny-sdxl")
    assert run_app(["render", str(path)]) == 0
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 6
    assert (tmp_path / "run" / "sheets" / "index.html").exists()


def test_thumbnail_lost_in_a_crash_is_rebuilt(tmp_path):
    path = write_recipe(tmp_path)
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    thumb = sorted((tmp_path / "run" / "thumbs").glob("*.jpg"))[1]
    thumb.unlink()
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    with Image.open(thumb) as im:
        assert max(im.size) == 256


def test_corrupt_manifest_and_unusable_output_are_clean_errors(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.sqlite").write_bytes(b"this is not sqlite" * 100)
    for argv in (["status", str(bad)], ["sheet", str(bad)], ["picks", str(bad)]):
        assert run_app(argv) == 2
        assert "not a readable imagegen manifest" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.sqlite").write_bytes(b"")
    assert run_app(["status", str(empty)]) == 2  # a read-only command never creates a schema
    assert "run `imagegen render`" in capsys.readouterr().err
    assert (empty / "manifest.sqlite").stat().st_size == 0
    path = write_recipe(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert run_app(["render", str(path), "--output", str(afile)]) == 2
    assert "cannot create the run folder" in capsys.readouterr().err
    assert run_app(["render", str(path), "--dtype", "int8"]) == 2
    assert "`dtype`" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_an_unloadable_model_does_not_stop_the_queue(tmp_path, capsys):
    from engine_fixtures import fake_checkpoint_shapes, write_fake_safetensors

    a = tmp_path / "a"
    a.mkdir()
    write_fake_safetensors(a / "m.safetensors", fake_checkpoint_shapes("sd15"))  # right keys, no weights
    broken = write_recipe(a, text=RECIPE.replace("builtin:{model}", "m.safetensors"))
    b = tmp_path / "b"
    b.mkdir()
    good = write_recipe(b)
    assert run_app(["render", str(broken), str(good), "--no-sheet"]) == 2
    assert "m.safetensors" in capsys.readouterr().err
    assert len(list((b / "run" / "images").glob("*.png"))) == 6


def test_resume_command_keeps_the_options(tmp_path, capsys):
    from imagegen.cli.render import _resume_options

    opts = _resume_options(device="cpu", dtype=None, batch_size=2, retry_failed=False, wait=True, fail_fast=False,
                           as_json=True, output=tmp_path / "o", no_sheet=True, allow_download=False)
    assert opts == ["--device", "cpu", "--batch-size", "2", "--wait", "--json", "--output", str(tmp_path / "o"), "--no-sheet"]


def test_manifest_disk_full_stops_cleanly_and_the_images_are_adopted(tmp_path):
    """SQLite's log can fill the disk before any PNG does: same clean stop, same resume."""
    import sqlite3 as sq

    from imagegen.errors import DiskFullError

    class FullAfter:
        def __init__(self, conn, ok_updates):
            self.conn, self.left = conn, ok_updates

        def __getattr__(self, name):
            return getattr(self.conn, name)

        def execute(self, sql, *args):
            if sql.startswith("UPDATE jobs SET status = 'done'"):
                if self.left == 0:
                    raise sq.OperationalError("database or disk is full")
                self.left -= 1
            return self.conn.execute(sql, *args)

    recipe = load_recipe(write_recipe(tmp_path))
    store = RunStore.open(tmp_path / "run")
    store._conn = FullAfter(store._conn, ok_updates=2)
    try:
        with pytest.raises(DiskFullError, match="run the same command again"):
            render_recipe(recipe, store, options=RenderOptions(batch_size=2))
    finally:
        store._conn = store._conn.conn
        store.close()
    assert not list((tmp_path / "run").rglob(".tmp-*"))
    events = []
    store = RunStore.open(tmp_path / "run")
    try:
        s = render_recipe(recipe, store, on_event=events.append)
        assert store.counts()["done"] == 6
    finally:
        store.close()
    assert events[0]["adopted"] >= 1 and s.rendered + events[0]["adopted"] + 2 == 6


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_metadata_that_a1111_and_json_readers_take_at_face_value(tmp_path):
    """AddNet LoRA hash in `Lora hashes` (full-file sha256 in the JSON), an explicit `Schedule
    type` where A1111's default schedule differs, and strict JSON (DPM++ 2M's scheduler config
    holds `lambda_min_clipped: -inf`)."""
    import hashlib
    import struct

    from engine_fixtures import make_tiny_lora

    lora = make_tiny_lora(tmp_path / "style.safetensors", "sd15", seed=3)
    data = lora.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    addnet = hashlib.sha256(data[8 + n:]).hexdigest()
    text = RECIPE.replace("seeds: [11, 12, 13]", "seeds: [11]").replace("scheduler: Euler a", "scheduler: DPM++ 2M")
    path = write_recipe(tmp_path, text=text, extra="loras:\n  - {path: style.safetensors, weight: 0.5}\n")
    assert run_app(["render", str(path), "--no-sheet"]) == 0
    image = sorted((tmp_path / "run" / "images").glob("*.png"))[0]
    chunks = read_png_text(image)
    params = parse_parameters(chunks["parameters"])
    assert params["Lora hashes"] == f"style: {addnet[:12]}"
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Uniform" and params["scheduler"] == "DPM++ 2M"
    prov = _strict(chunks["imagegen"])
    assert prov["loras"][0]["sha256"] == hashlib.sha256(data).hexdigest() != addnet
    assert prov["loras"][0]["addnet_hash"] == addnet
    assert prov["scheduler_config"]["lambda_min_clipped"] == "-Infinity"


def test_lora_tags_and_embeddings_through_render(tmp_path):
    """`<lora:gold:0.8>` renders as `loras: [{path: gold, weight: 0.8}]` does; embeddings used
    by a prompt get `TI hashes`; a non-default emphasis with brackets gets `Emphasis:`."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from engine_fixtures import make_tiny_lora

    (tmp_path / "loras").mkdir()
    make_tiny_lora(tmp_path / "loras" / "gold.safetensors", "sd15", seed=3)
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))}, str(tmp_path / "shiny.safetensors"))
    base = RECIPE.replace("seeds: [11, 12, 13]", "seeds: [11]").replace('  - "a {{red|blue}} cup"', '  - "a (red:1.3) shiny cup{tag}"')
    tagged = write_recipe(tmp_path, text=base.replace("{tag}", " <lora:gold:0.8>").replace("output: run", "output: tagged"),
                          extra="lora_dir: loras\nembeddings: [shiny.safetensors]\nemphasis: no-norm\n")
    assert run_app(["render", str(tagged), "--no-sheet"]) == 0
    listed = tmp_path / "listed.yaml"
    listed.write_text(textwrap.dedent(base.replace("{tag}", "").replace("output: run", "output: listed")).format(model="tiny-sd15")
                      + "loras:\n  - {path: loras/gold.safetensors, weight: 0.8}\nembeddings: [shiny.safetensors]\nemphasis: no-norm\n")
    assert run_app(["render", str(listed), "--no-sheet"]) == 0
    [a] = sorted((tmp_path / "tagged" / "images").glob("*.png"))
    [b] = sorted((tmp_path / "listed" / "images").glob("*.png"))
    assert a.name == b.name  # the same job: same content, same id
    assert np.abs(pixels(a) - pixels(b)).max() == 0
    params = parse_parameters(read_png_text(a)["parameters"])
    assert params["prompt"] == "a (red:1.3) shiny cup" and params["loras"] == [("gold", 0.8)]
    sha = hashlib.sha256((tmp_path / "shiny.safetensors").read_bytes()).hexdigest()
    assert params["TI hashes"] == f"shiny: {sha[:12]}" and params["Emphasis"] == "No norm"
    prov = read_provenance(a)
    assert prov["embeddings"] == [{"name": "shiny", "path": str(tmp_path / "shiny.safetensors"), "sha256": sha}]
    assert run_app(["reproduce", str(a)]) == 0
