"""Crash safety for real: kill -9 at random moments, signals, the run-folder lock."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.cli import run_app
from imagegen.errors import RunLockedError
from imagegen.store import RunStore

RECIPE = """
name: crash
model:
  checkpoint: builtin:tiny-sd15
prompt: "a {red|green|blue|white|black} bowl"
seeds: [1, 2, 3, 4]
size: 64x64
steps: 3
scheduler: Euler a
batch_size: 1
output: run
"""


def make(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    return path


# Runs the real CLI with file writes slowed down (each file goes out in small chunks with a
# pause), so that kills often land in the middle of writing an image or a thumbnail.
SLOW_WRITES = textwrap.dedent("""
    import io, sys, time
    import imagegen.fsutil as fsutil
    real = fsutil.write_atomic
    def slow(path, write):
        def chunked(handle):
            buf = io.BytesIO()
            write(buf)
            data = buf.getvalue()
            for i in range(0, len(data), 2048):
                handle.write(data[i:i + 2048])
                handle.flush()
                time.sleep(0.01)
        real(path, chunked)
    fsutil.write_atomic = slow
    from imagegen.cli import run_app
    sys.exit(run_app(sys.argv[1:]))
""")


def start(recipe: Path, *extra: str, slow_writes: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    head = [sys.executable, "-c", SLOW_WRITES] if slow_writes else [sys.executable, "-m", "imagegen"]
    return subprocess.Popen([*head, "render", str(recipe), "--no-sheet", *extra],
                            cwd=recipe.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def assert_final_files_complete(run: Path) -> None:
    """Every file under a final name decodes completely: a kill never leaves a truncated one."""
    for p in [*(run / "images").glob("*.png"), *(run / "thumbs").glob("*.jpg")]:
        with Image.open(p) as im:
            im.load()


def images_logged(run: Path) -> int:
    try:
        return sum(1 for line in (run / "log.jsonl").read_text().splitlines() if '"event": "image"' in line)
    except FileNotFoundError:
        return 0


def wait_for_images(proc: subprocess.Popen, run: Path, count: int, timeout: float = 900) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if images_logged(run) >= count:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("render made no progress")


def check_consistent(run: Path, *, just_killed: bool = False) -> tuple[dict[str, str], set[str]]:
    """Manifest and disk agree; returns ({job id: image sha256} of finished jobs, ids with a thumbnail).

    Right after kill -9 a `.tmp-*` file may exist (nothing can clean up after SIGKILL); it is
    never under a final name, and the next start removes it."""
    temps = list(run.rglob(".tmp-*"))
    if just_killed:
        assert all(not p.name.endswith((".png", ".jpg")) for p in temps), "a temp file carries a final name"
    else:
        assert not temps, "a half-written file was left behind"
    with sqlite3.connect(run / "manifest.sqlite") as db:
        rows = db.execute("SELECT id, status, file, sha256 FROM jobs").fetchall()
    done = {}
    for job_id, status, file, sha in rows:
        if status == "done":
            data = (run / file).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha
            done[job_id] = sha
    on_disk = {p.stem.split("-")[1] for p in (run / "images").glob("*.png")}
    thumbs = {p.stem.split("-")[1] for p in (run / "thumbs").glob("*.jpg")}
    # an image may exist before its row says done (killed between rename and commit);
    # the next start adopts it, so only "done without a file" is an inconsistency
    assert set(done) <= on_disk
    return done, thumbs


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_identical_images(tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = make(ref_dir)
    assert subprocess.run([sys.executable, "-m", "imagegen", "render", str(ref), "--no-sheet"], cwd=ref_dir,
                          capture_output=True).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    recipe = make(work)
    run = work / "run"
    rng = random.Random(20261121)
    kills = 0
    for attempt in range(8):
        if kills == 4:
            break
        proc = start(recipe, slow_writes=True)
        target = images_logged(run) + rng.randint(1, 2)
        if wait_for_images(proc, run, target):
            time.sleep(rng.uniform(0.0, 0.25))  # land anywhere: generating, writing, renaming, committing
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
        check_consistent(run, just_killed=True)
        assert_final_files_complete(run)
    assert kills >= 3
    final = subprocess.run([sys.executable, "-m", "imagegen", "render", str(recipe), "--no-sheet"], cwd=work,
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    done, thumbs = check_consistent(run)
    assert len(done) == 20 and set(done) == thumbs  # thumbnails a kill left out were rebuilt
    ref_images = sorted((ref_dir / "run" / "images").glob("*.png"))
    got = sorted((run / "images").glob("*.png"))
    assert [p.name for p in got] == [p.name for p in ref_images]
    for a, b in zip(got, ref_images):
        pa = np.asarray(Image.open(a).convert("RGB"))
        pb = np.asarray(Image.open(b).convert("RGB"))
        assert np.array_equal(pa, pb), a.name
    # nothing was rendered twice: one "image" event per job across all runs
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rendered = [e["id"] for e in events if e["event"] == "image"]
    assert len(rendered) == len(set(rendered))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_what_is_generated_and_says_how_to_resume(tmp_path, sig, code):
    recipe = make(tmp_path)
    run = tmp_path / "run"
    proc = start(recipe)
    assert wait_for_images(proc, run, 1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "to resume: imagegen render" in err and str(recipe) in err
    done, _ = check_consistent(run)
    assert 1 <= len(done) < 20
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "finish" and events[-1]["interrupted"] == signal.Signals(sig).name
    assert run_app(["render", str(recipe), "--no-sheet"]) == 0
    assert len(check_consistent(run)[0]) == 20


def test_lock_names_holder_and_stale_lock_is_recovered(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from imagegen.store import RunStore
        s = RunStore.open({str(run)!r})
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            RunStore.open(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # the holder died without cleaning up: its lock is taken over at once
    RunStore.open(run).close()


def test_wait_flag_waits_for_the_lock(tmp_path, capsys):
    recipe = make(tmp_path)
    recipe.write_text(recipe.read_text().replace("seeds: [1, 2, 3, 4]", "seeds: [1]"))
    store = RunStore.open(tmp_path / "run")
    timer = threading.Timer(1.0, store.close)
    timer.start()
    t0 = time.monotonic()
    try:
        assert run_app(["render", str(recipe), "--no-sheet", "--wait"]) == 0
    finally:
        timer.cancel()
    assert time.monotonic() - t0 >= 0.9
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 5
