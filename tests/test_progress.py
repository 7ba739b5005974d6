"""What a person sees while a render runs: progress lines, --json events, --dry-run, Ctrl-C twice.

Real renders on builtin:tiny-sd15 (tiny sizes); the terminal-less (cron) output is what pytest
captures, since stderr is not a terminal here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from imagegen.cli import run_app

RECIPE = """
name: progress
model:
  checkpoint: builtin:tiny-sd15
prompt: "a {red|blue} cup"
seeds: 4
size: 64x64
steps: 2
guidance: [5, 7]
scheduler: Euler
batch_size: 4
output: run
"""


def write(tmp_path: Path, text: str = RECIPE) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def progress_lines(err: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in re.finditer(r"(\d+)/(\d+) \(\d+ failed\), [\d.]+ img/s, ETA", err)]


def test_progress_counts_every_finished_image(tmp_path, capsys, one_thread):
    # 16 jobs in batches of 4. Every progress event counts exactly the images finished before it
    # (the bug: a line said 1/48 when 8 were done); the event comes right after the writes of
    # a batch are harvested, so the count moves by whole batches or less, never lags a batch.
    assert run_app(["render", str(write(tmp_path)), "--no-sheet", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finished = 0
    counts = []
    for e in events:
        if e["event"] == "image":
            finished += 1
        elif e["event"] == "progress":
            assert e["rendered"] == finished and e["to_render"] == 16
            counts.append(e["rendered"])
    assert counts and counts[-1] == 16 and counts == sorted(counts)
    assert len(counts) >= 2  # one event per harvest that finished images


def test_plain_progress_lines_show_the_totals(tmp_path, capsys, one_thread):
    # Without a terminal (cron): timestamped lines, the first with a real ETA, the last 16/16.
    assert run_app(["render", str(write(tmp_path)), "--no-sheet"]) == 0
    err = capsys.readouterr().err
    lines = progress_lines(err)
    assert lines and lines[-1] == (16, 16), err
    assert all(total == 16 for _, total in lines) and [d for d, _ in lines] == sorted(d for d, _ in lines)
    first = re.search(r"(\d+)/16 \(0 failed\), ([\d.]+) img/s, ETA (\S+)", err)
    assert first and (int(first[1]) == 16 or first[3] != "unknown"), err


def test_json_events_carry_timestamps_and_progress(tmp_path, capsys, one_thread):
    before = time.time()
    assert run_app(["render", str(write(tmp_path)), "--no-sheet", "--json", "--limit", "8"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(before - 1 <= e["ts"] <= time.time() + 1 for e in events)
    assert [e["rendered"] for e in events if e["event"] == "progress"][-1] == 8
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["ts"] for e in logged] == [e["ts"] for e in events]  # one stamp, in both places


def test_dry_run_shows_every_varying_axis_and_failures_only_when_there_are_some(tmp_path, capsys):
    assert run_app(["render", str(write(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out
    job1 = next(line for line in out.splitlines() if line.strip().startswith("1 "))
    job9 = next(line for line in out.splitlines() if line.strip().startswith("9 "))
    assert "guidance=5" in job1 and "seed=0" in job1 and "a red cup" in job1
    assert "guidance=7" in job9 and job1.split("::")[1] == job9.split("::")[1]  # same prompt, told apart


def test_skipped_invalid_recipe_is_said_with_time_and_word(tmp_path, capsys, one_thread):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nprompt: x\n")
    good = write(tmp_path, RECIPE.replace("seeds: 4", "seeds: 1").replace("guidance: [5, 7]", "guidance: 5"))
    assert run_app(["render", str(bad), str(good), "--no-sheet"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d imagegen: skipped {re.escape(str(bad))}; the queue goes on$",
                     err, re.M), err
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 2


@pytest.mark.slow
def test_second_ctrl_c_aborts_and_leaves_a_trace(tmp_path):
    recipe = write(tmp_path, RECIPE.replace("seeds: 4", "seeds: 40").replace("steps: 2", "steps: 6"))
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "imagegen", "render", str(recipe), "--no-sheet"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()

    def wait_for(predicate) -> None:  # on events, not on time (the deadline only ends a hang)
        deadline = time.monotonic() + 900
        while not predicate():
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.02)

    log = run / "log.jsonl"
    wait_for(lambda: log.exists() and '"event": "image"' in log.read_text())
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: any("finishing the images already generated" in line for line in lines))
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=30)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "aborted by a second Ctrl-C" in err and f"to resume: imagegen render {recipe}" in err
    events = [json.loads(line) for line in log.read_text().splitlines()]
    last, start = events[-1], next(e for e in events if e["event"] == "start")
    assert last["event"] == "finish" and last["aborted"] is True and last["interrupted"] == "SIGINT"
    assert last["rendered"] + last["failed"] + last["left"] == start["to_render"] and last["left"] > 0
    # the next run resumes from what was written
    assert run_app(["render", str(recipe), "--no-sheet", "--limit", "1"]) == 0
