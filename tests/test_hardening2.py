"""Issue 11, second round: run-folder ownership, concurrent picks, large recipes, special
input files, leftovers. One test per finding (its own input, the promise checked)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from imagegen.cli import run_app
from imagegen.errors import InputError
from imagegen.picks import read_orphans, read_picks, remap_picks, update_picks
from imagegen.store import RunStore

RECIPE = """
name: {name}
model:
  checkpoint: builtin:tiny-sd15
prompt: "a {{red|blue}} bowl"
size: 64x64
steps: 2
batch_size: 1
output: {output}
"""


def recipe(tmp_path: Path, output: str, name: str = "mine") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(name=name, output=output)))
    return path


@pytest.fixture(scope="module")
def rendered_run(tmp_path_factory):
    """A finished 2-image render of RECIPE (name `pipe`), rendered once per module."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("rendered")
    path = folder / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(name="pipe", output="run")))
    subprocess.run([sys.executable, "-m", "imagegen", "render", str(path)], cwd=folder, check=True, timeout=900,
                   capture_output=True)
    return folder / "run"


@pytest.fixture
def piped_run_copy(rendered_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(rendered_run, run)
    return run


def one_line_exit_2(capsys, argv) -> str:
    capsys.readouterr()
    assert run_app(argv) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1, said
    return said[0]


# --- finding 3: a folder that is not this recipe's run -------------------------------------------


def test_a_folder_of_your_own_files_is_refused_and_untouched(tmp_path, capsys):
    mine = tmp_path / "stuff"
    (mine / "images").mkdir(parents=True)
    files = {"recipe.yaml": b"my own recipe", ".tmp-notes.txt": b"notes", "images/cat.png": b"cat"}
    for name, data in files.items():
        (mine / name).write_bytes(data)
    line = one_line_exit_2(capsys, ["render", str(recipe(tmp_path, str(mine)))])
    assert "not an imagegen run folder" in line
    assert {n: (mine / n).read_bytes() for n in files} == files
    assert not (mine / "manifest.sqlite").exists() and not (mine / "thumbs").exists()


@pytest.mark.parametrize("where", ["/", "home"])
def test_root_and_home_are_never_run_folders(tmp_path, capsys, monkeypatch, where):
    if where == "home":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        (tmp_path / "home").mkdir()
        where = str(tmp_path / "home")
    line = one_line_exit_2(capsys, ["render", str(recipe(tmp_path, where))])
    assert "filesystem root" in line or "home folder" in line
    if where != "/":
        assert list(Path(where).iterdir()) == []


@pytest.mark.parametrize("sub", ["images", "thumbs", "sheets", "upscaled", "first"])
def test_symlinked_sub_folders_are_refused(tmp_path, capsys, sub):
    run = tmp_path / "run"
    RunStore.open(run).close()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / ".tmp-x.png.123.abcdef").write_bytes(b"someone else's")
    if (run / sub).exists():
        (run / sub).rmdir()
    (run / sub).symlink_to(target, target_is_directory=True)
    line = one_line_exit_2(capsys, ["render", str(recipe(tmp_path, str(run)))])
    assert "is a symlink" in line and sub in line
    assert (target / ".tmp-x.png.123.abcdef").exists()
    with pytest.raises(InputError, match="is a symlink"):
        RunStore.open(run, create=False, lock=False)


def test_an_empty_folder_and_a_crashed_start_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    RunStore.open(tmp_path / "empty", recipe_name="mine").close()
    crashed = tmp_path / "crashed"  # died between mkdir and the manifest
    (crashed / "images").mkdir(parents=True)
    (crashed / ".lock").write_text("{}")
    RunStore.open(crashed, recipe_name="mine").close()


def test_a_run_of_another_recipe_is_refused_unless_adopted(tmp_path, capsys):
    run = tmp_path / "run"
    with RunStore.open(run, recipe_name="first") as store:
        store.freeze_recipe("name: first\n", "a" * 64, "first")
    line = one_line_exit_2(capsys, ["render", str(recipe(tmp_path, str(run), name="second"))])
    assert "recipe 'first'" in line and "--adopt" in line
    with pytest.raises(InputError, match="recipe 'first'"):
        RunStore.open(run, recipe_name="second")
    RunStore.open(run, recipe_name="second", adopt=True).close()
    RunStore.open(run, recipe_name="first").close()


def fake_jobs(ids):
    return [{"id": job_id, "index": i} for i, job_id in enumerate(ids, 1)]


def test_picks_of_gone_jobs_stay_as_comments_and_come_back(tmp_path):
    a = [f"{i:012x}" for i in range(1, 21)]
    b = [f"{i:012x}" for i in range(101, 106)]
    with RunStore.open(tmp_path / "run") as store:
        store.sync_plan(fake_jobs(a))
        update_picks(store, ["3", "7", "12"])
        text = store.picks_file.read_text().replace("\n7\n", "\n7  # the good one\n")
        store.picks_file.write_text(text)
        old = {r.index: r.id for r in store.rows()}
        store.sync_plan(fake_jobs(b))  # another recipe adopted the folder: all 20 jobs orphaned
        moved, orphaned = remap_picks(store, old)
        assert len(orphaned) == 3 and read_picks(store.picks_file) == []
        assert set(read_orphans(store.picks_file)) == {a[2], a[6], a[11]}
        assert read_orphans(store.picks_file)[a[6]] == (7, "the good one")
        update_picks(store, ["2"])  # a later pick keeps the comments
        assert set(read_orphans(store.picks_file)) == {a[2], a[6], a[11]}
        old = {r.index: r.id for r in store.rows()}
        store.sync_plan(fake_jobs(a))  # the first recipe again: its picks are back, with their note
        remap_picks(store, old)
        assert read_picks(store.picks_file) == [3, 7, 12]
        assert "7  # the good one" in store.picks_file.read_text()
        assert read_orphans(store.picks_file) == {b[1]: (2, "")}  # the second recipe's pick waits in turn


# --- finding 5: concurrent picks ------------------------------------------------------------------


def test_two_concurrent_picks_never_lose_one(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    with RunStore.open(run) as store:
        store.sync_plan(fake_jobs([f"{i:012x}" for i in range(1, 41)]))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for k in range(10):
        procs = [subprocess.Popen([sys.executable, "-m", "imagegen", "pick", str(run), str(2 * k + n)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in (1, 2)]
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read()
            p.stderr.close()
        assert read_picks(run / "picks.txt") == list(range(1, 2 * k + 3)), f"try {k + 1}: a pick was lost"
    with RunStore.open(run, create=False, lock=False) as store:
        assert [r[0] for r in store._conn.execute("SELECT idx FROM picks ORDER BY idx")] == list(range(1, 21))


def test_pick_refreshes_index_html_and_from_keeps_later_cli_picks(piped_run_copy, tmp_path, capsys):
    import json
    import re

    run = piped_run_copy
    assert run_app(["pick", str(run), "1"]) == 0
    page = (run / "sheets" / "index.html").read_text()
    data = json.loads(re.search(r'"picked":(\[[^\]]*\])', page).group(1))
    assert data == [1]
    header = re.search(r'"header":(\[[^\]]*\])', page).group(1)
    page_line = json.loads(header.replace("\\u003c", "<").replace("\\u003e", ">").replace("\\u0026", "&"))[1]
    # the browser exports what the page showed (pick 1) plus nothing; meanwhile the CLI picked 2
    assert run_app(["pick", str(run), "2"]) == 0
    export = tmp_path / "export.txt"
    export.write_text(f"# imagegen picks: pipe\n# {page_line}\n1\n")
    capsys.readouterr()
    assert run_app(["pick", str(run), "--from", str(export)]) == 0
    said = capsys.readouterr().err
    assert "kept 1 picks made on the command line after the page was written" in said and ": 2" in said
    assert read_picks(run / "picks.txt") == [1, 2]
    # an export without the page line still replaces the picks
    export.write_text("2\n")
    assert run_app(["pick", str(run), "--from", str(export)]) == 0
    assert read_picks(run / "picks.txt") == [2]
    assert '"picked":[2]' in (run / "sheets" / "index.html").read_text()


# --- finding 2: a large recipe ---------------------------------------------------------------------


def test_a_large_recipe_keeps_every_image_readable(tmp_path, capsys):
    import hashlib
    import json
    import sqlite3
    import subprocess
    import sys

    import numpy as np
    import torch
    from PIL import Image

    from imagegen.defaults import RECIPE_INLINE_BYTES
    from imagegen.upscale.archs.compact.net import SRVGGNetCompact

    comments = "".join(f"# comment line {i:05d} " + "x" * 41 + "\n" for i in range(20_000))
    path = tmp_path / "big.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(name="big", output="run")) + comments)
    assert path.stat().st_size > 1_250_000
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "imagegen", "render", str(path)], cwd=tmp_path, env=env, check=True,
                   timeout=900, capture_output=True)
    run = tmp_path / "run"
    images = sorted((run / "images").glob("*.png"))
    assert len(images) == 2
    for image in images:
        with Image.open(image) as im:  # Pillow's default MAX_TEXT_CHUNK
            prov = json.loads(im.text["imagegen"])
        assert len(im.info["imagegen"]) < RECIPE_INLINE_BYTES + 64 * 1024
        rec = prov["recipe"]
        assert rec["text"] is None and rec["text_bytes"] == path.stat().st_size
        assert hashlib.sha256((run / rec["text_file"]).read_bytes()).hexdigest() == rec["sha256"]
        assert (run / rec["text_file"]).read_bytes() == path.read_bytes()
    # a crash after the files were written, before the manifest said so: they are adopted, not rendered again
    conn = sqlite3.connect(run / "manifest.sqlite")
    conn.execute("UPDATE jobs SET status = 'pending'")
    conn.commit()
    conn.close()
    capsys.readouterr()
    assert run_app(["render", str(path), "--no-sheet", "--json"]) == 0
    start = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"start"' in line][0]
    assert start["adopted"] == 2 and start["to_render"] == 0
    assert run_app(["reproduce", str(images[0])]) == 0
    torch.manual_seed(0)
    model = tmp_path / "tiny-x4.pth"
    torch.save({"params": SRVGGNetCompact(num_feat=4, num_conv=1, scale=4).state_dict()}, model)
    assert run_app(["pick", str(run), "1"]) == 0
    assert run_app(["upscale", str(run), "--model", str(model), "--width", "128", "--format", "png"]) == 0
    [out] = list((run / "upscaled").glob("*.png"))
    with Image.open(out) as im:
        assert im.size == (128, 128) and "imagegen" in im.text
    assert np.asarray(Image.open(out)).shape == (128, 128, 3)


# --- finding 7: special files as inputs ------------------------------------------------------------


def special_inputs(tmp_path: Path) -> dict[str, Path]:
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    return {"device": zero, "fifo": fifo}


@pytest.mark.parametrize("kind", ["device", "fifo"])
@pytest.mark.parametrize("key", ["checkpoint", "vae", "lora", "upscale", "hires"])
def test_special_files_are_refused_by_validate(tmp_path, capsys, kind, key):
    bad = special_inputs(tmp_path)[kind]
    text = textwrap.dedent(RECIPE.format(name="s", output="run"))
    if key == "checkpoint":
        text = text.replace("builtin:tiny-sd15", str(bad))
    elif key == "vae":
        text = text.replace("  checkpoint: builtin:tiny-sd15\n", f"  checkpoint: builtin:tiny-sd15\n  vae: {bad}\n")
    elif key == "lora":
        text += f"loras:\n  - path: {bad}\n    weight: 0.5\n"
    elif key == "upscale":
        text += f"upscale:\n  model: {bad}\n  scale: 2\n"
    else:
        text += f"hires:\n  scale: 2\n  upscaler: {bad}\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    line = one_line_exit_2(capsys, ["validate", str(path)])
    assert f"is a {kind.replace('fifo', 'FIFO')}" in line and str(bad) in line, line


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_special_files_are_refused_by_upscale(tmp_path, kind):
    import subprocess
    import sys

    bad = special_inputs(tmp_path)[kind]
    image = tmp_path / "x.png"
    os.symlink(bad, image)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for argv in (["upscale", str(image), "--model", str(tmp_path / "m.pth"), "--scale", "2"],
                 ["upscale", str(tmp_path / "ok.png"), "--model", str(bad), "--scale", "2"]):
        if not (tmp_path / "ok.png").exists():
            from PIL import Image

            Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
        proc = subprocess.run([sys.executable, "-m", "imagegen", *argv], env=env, capture_output=True, text=True, timeout=120)
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1 and f"is a {kind.replace('fifo', 'FIFO')}" in said[0], proc.stderr


def test_sigterm_during_a_long_hash_stops_at_once(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    vae = tmp_path / "vae.safetensors"
    with open(vae, "wb") as f:
        f.truncate(200 << 30)  # sparse: 200 GB of zeros to hash, minutes of work
    text = textwrap.dedent(RECIPE.format(name="h", output="run")).replace(
        "  checkpoint: builtin:tiny-sd15\n", f"  checkpoint: builtin:tiny-sd15\n  vae: {vae}\n")
    (tmp_path / "r.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "IMAGEGEN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "imagegen", "render", "r.yaml", "--no-sheet"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and '"start"' in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no start"
        time.sleep(0.2)
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == 143 and time.monotonic() - sent < 30
    assert "stopped by SIGTERM while hashing" in proc.stderr.read()
    proc.stderr.close()


# --- leftovers ----------------------------------------------------------------------------------


def test_status_says_what_happened_when_the_wal_was_deleted_under_a_render(tmp_path, capsys):
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = textwrap.dedent(f"""
        import sys, time
        from imagegen.store import RunStore
        store = RunStore.open({str(run)!r})
        store.sync_plan([{{"id": f"{{i:012x}}", "index": i}} for i in range(1, 5)])
        print("ready", flush=True)
        sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", holder], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        (run / "manifest.sqlite-wal").unlink()
        line = one_line_exit_2(capsys, ["status", str(run)])
        assert f"PID {proc.pid}" in line and "manifest.sqlite-wal was deleted" in line and "missing schema" not in line
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()


def test_sheet_and_upscale_clean_their_own_leftovers_only(piped_run_copy, tmp_path):
    import torch

    from imagegen.upscale.archs.compact.net import SRVGGNetCompact

    run = piped_run_copy
    dead = ".tmp-sheet-05.jpg.999999999.abcdef"  # no such PID: a killed sheet's leftover
    (run / "sheets" / dead).write_bytes(b"partial")
    (run / "sheets" / ".tmp-notes.txt").write_bytes(b"mine")
    for n in (2, 3, 4):  # an earlier, longer set of pages
        (run / "sheets" / f"sheet-{n:02d}.jpg").write_bytes(b"old")
    assert run_app(["sheet", str(run)]) == 0
    assert not (run / "sheets" / dead).exists() and (run / "sheets" / ".tmp-notes.txt").exists()
    page = (run / "sheets" / "index.html").read_text()
    pages = sorted(p.name for p in (run / "sheets").glob("sheet-*.jpg"))
    assert pages == ["sheet-01.jpg"] and 'href="sheet-01.jpg"' in page and "sheet-02.jpg" not in page
    up = run / "upscaled"
    up.mkdir()
    leftover = up / ".tmp-0001-abcdef123456-256w.png.999999999.a1b2c3"
    leftover.write_bytes(b"x" * 1000)
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # another imagegen, writing now
    live = up / f".tmp-other.png.{writer.pid}.a1b2c4"
    live.write_bytes(b"being written")
    torch.manual_seed(0)
    model = tmp_path / "tiny-x4.pth"
    torch.save({"params": SRVGGNetCompact(num_feat=4, num_conv=1, scale=4).state_dict()}, model)
    assert run_app(["pick", str(run), "2"]) == 0
    assert run_app(["upscale", str(run), "--model", str(model), "--scale", "2", "--format", "png"]) == 0
    try:
        assert not leftover.exists() and live.exists()  # a live writer's temp file is not a leftover
    finally:
        writer.kill()
        writer.wait()
    assert sorted(p.name for p in up.iterdir()) == sorted([live.name] + [p.name for p in up.glob("*.png")])
