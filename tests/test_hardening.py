"""Issue 11: hostile and unlucky inputs get one line and exit 2, or are handled without loss.

One test per finding (the finding's own input, the promise checked), then hypothesis
strategies that generate each class of input. Timing is measured by bench/validate_limits.py,
not here: these tests check what is said and that nothing is built before the cap is checked.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagegen import prompts as P
from imagegen.cli import run_app
from imagegen.defaults import MAX_JOBS_LIMIT, MAX_YAML_DEPTH
from imagegen.errors import InputError, ModelError, RecipeError
from imagegen.recipe import load_recipe

HEAD = "name: bomb\nmodel:\n  checkpoint: builtin:tiny-sd15\n"
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def refused(tmp_path: Path, text: str, name: str = "r.yaml") -> str:
    """Validate `text`; it must be refused with exactly one problem line, which is returned."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert len(info.value.problems) == 1, info.value.problems
    assert "\n" not in info.value.problems[0]
    return info.value.problems[0]


def alias_bomb(levels: int, fan: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(['"x"'] * fan) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return HEAD + 'prompt: "p"\n' + "\n".join(lines) + f"\nseeds: *a{levels - 1}\n"


# --- finding 6: count before you build ----------------------------------------------------------


def test_alias_bomb_stops_at_the_value_limit(tmp_path):
    assert "YAML aliases" in refused(tmp_path, alias_bomb(9))


def test_combinatorial_prompt_is_counted_not_expanded(tmp_path, monkeypatch):
    def no_expand(*a, **k):
        raise AssertionError("variants were built before the job cap was checked")

    monkeypatch.setattr(P, "expand", no_expand)
    text = HEAD + 'prompt: "{' + "|".join(f"a{i}" for i in range(1000)) + "} {" + "|".join(f"b{i}" for i in range(999)) + '}"\n'
    assert "expands to 999000 jobs" in refused(tmp_path, text)
    sixty = "|".join(f"w{i}" for i in range(60))
    assert "2558620845 variants" in refused(tmp_path, HEAD + f'prompt: "{{8$${sixty}}}"\n')


def test_big_wildcard_with_small_max_jobs_is_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "expand", lambda *a, **k: pytest.fail("expanded"))
    (tmp_path / "wild").mkdir()
    (tmp_path / "wild" / "big.txt").write_text("\n".join(f"word{i}" for i in range(20_000)))
    assert "20000 jobs" in refused(tmp_path, HEAD + 'prompt: "__big__"\nwildcards: wild\nmax_jobs: 10\n')


def test_huge_seed_lists_and_huge_files(tmp_path):
    assert "more than `max_jobs: 5000`" in refused(tmp_path, HEAD + 'prompt: "p"\nseeds: [' + ", ".join(map(str, range(6000))) + "]\n")
    big = HEAD + 'prompt: "p"\nseeds: [' + ", ".join(map(str, range(700_000))) + "]\n"  # ~5 MB
    assert "at most 4 MB" in refused(tmp_path, big)


def test_huge_max_jobs_with_huge_seed_count(tmp_path):
    line = refused(tmp_path, HEAD + 'prompt: "p"\nmax_jobs: 1000000000000000000000\nseeds: 4294967296\n')
    assert f"from 1 to {MAX_JOBS_LIMIT}" in line


def test_the_traceback_list_gets_one_line(tmp_path):
    assert "nest more than" in refused(tmp_path, HEAD + 'prompt: "p"\nseeds: ' + "[" * 5000 + "]" * 5000 + "\n")
    assert "nest more than" in refused(tmp_path, HEAD + 'prompt: "p"\nx: ' + "{a: " * 500 + "1" + "}" * 500 + "\n")
    assert "nest more than" in refused(tmp_path, HEAD + 'prompt: "' + "{a|" * 3000 + "}" * 3000 + '"\n')


def test_recipe_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    with pytest.raises(RecipeError, match="not a regular file"):
        load_recipe(fifo)


def safetensors(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


@pytest.mark.parametrize("header", [b"[1,2,3]", b"[" * 200_000, b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
                                    b'{"w": {"dtype": "F32"}}', b'{"w": 5}'])
def test_damaged_safetensors_header_is_one_line(tmp_path, header):
    from imagegen.modelfiles import detect_family

    with pytest.raises(ModelError, match="not a readable .safetensors file"):
        detect_family(safetensors(tmp_path / "m.safetensors", header))


def test_plan_prints_user_text_as_text_never_markup(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + 'prompt: "a [/red] cat {[bold]x|y}"\nsize: 64x64\n')
    assert run_app(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[/red]" in out and "[bold]x" in out


def test_bad_hash_cache_is_rebuilt(tmp_path, monkeypatch):
    from imagegen.metadata import _hash_cache_path, sha256_file

    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "f.bin"
    target.write_bytes(b"abc")
    for junk in ("[]", "{", '{"k": 5}', "null"):
        _hash_cache_path().parent.mkdir(parents=True, exist_ok=True)
        _hash_cache_path().write_text(junk)
        assert sha256_file(target) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        assert isinstance(json.loads(_hash_cache_path().read_text()), dict)


def test_manifest_row_with_bad_json_is_named_with_a_repair(tmp_path):
    from imagegen.store import MANIFEST, RunStore

    with RunStore.open(tmp_path / "run") as store:
        pass
    conn = sqlite3.connect(tmp_path / "run" / MANIFEST)
    conn.execute("INSERT INTO jobs (id, idx, status, in_plan, job, attempts) VALUES ('abc123', 7, 'pending', 1, '{', 0)")
    conn.commit()
    conn.close()
    with RunStore.open(tmp_path / "run", create=False, lock=False) as store, pytest.raises(InputError) as info:
        store.rows()
    assert "job abc123 (#7)" in info.value.message and "DELETE FROM jobs WHERE id = 'abc123'" in info.value.message


RENDER = """
name: pipe
model:
  checkpoint: builtin:tiny-sd15
prompt: "a {red|blue} bowl"
size: 64x64
steps: 2
batch_size: 1
output: run
"""


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """A render whose stdout and stderr go to a pipe whose reader left before the first line."""
    folder = tmp_path_factory.mktemp("piped")
    recipe = folder / "r.yaml"
    recipe.write_text(textwrap.dedent(RENDER))
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "imagegen", "render", str(recipe), "--no-sheet"], cwd=folder,
                          stdout=write, stderr=write, timeout=900)
    os.close(write)
    return proc.returncode, folder / "run"


def test_reproduce_of_a_truncated_png_is_one_line_before_any_render(piped_run, tmp_path, capsys):
    from imagegen.cli import run_app

    _, run = piped_run
    src = sorted((run / "images").glob("*.png"))[0]
    damaged = tmp_path / src.name
    data = src.read_bytes()
    damaged.write_bytes(data[: len(data) - 300])  # text chunks intact, pixel data cut
    assert run_app(["reproduce", str(damaged)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the image is damaged" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_closed_stderr_pipe_does_not_kill_a_render(piped_run):
    code, run = piped_run
    assert code == 0
    assert len(list((run / "images").glob("*.png"))) == 2
    assert (run / "log.jsonl").read_text().count('"event": "image"') == 2


# --- hypothesis: the classes ---------------------------------------------------------------------


@FAST
@given(depth=st.integers(1, 3 * MAX_YAML_DEPTH), flow=st.sampled_from(["[", "{x: "]))
def test_any_nesting_depth_is_ok_or_one_line(tmp_path, depth, flow):
    close = "]" if flow == "[" else "}"
    text = HEAD + 'prompt: "p"\nsize: 64x64\nseeds: ' + flow * depth + "1" + close * depth + "\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    if depth == 1 and flow == "[":
        assert load_recipe(path).seeds == (1,)
        return
    with pytest.raises(RecipeError) as info:  # nested seeds are refused: problem lines, no traceback
        load_recipe(path)
    assert all("\n" not in line for line in info.value.problems)
    if depth > MAX_YAML_DEPTH - 1:
        assert len(info.value.problems) == 1 and "nest more than" in info.value.problems[0]


@FAST
@given(levels=st.integers(1, 8), fan=st.integers(1, 12))
def test_any_alias_fan_out_is_ok_or_one_line(tmp_path, levels, fan):
    path = tmp_path / "r.yaml"
    path.write_text(alias_bomb(levels, fan).replace('"x"', "1") + "size: 64x64\n")
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert len(exc.problems) >= 1 and all("\n" not in p for p in exc.problems)
        if fan ** levels > 100_000:
            assert len(exc.problems) == 1 and "YAML aliases" in exc.problems[0]


@FAST
@given(groups=st.lists(st.integers(1, 400), min_size=1, max_size=4), max_jobs=st.integers(1, 5000))
def test_combinatorial_prompts_count_exactly_and_cap_before_building(tmp_path, groups, max_jobs):
    prompt = " ".join("{" + "|".join(f"g{g}o{i}" for i in range(n)) + "}" for g, n in enumerate(groups))
    total = 1
    for n in groups:
        total *= n
    assert P.count_variants(prompt) == total
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + f'prompt: "{prompt}"\nsize: 64x64\nmax_jobs: {max_jobs}\n')
    if total > max_jobs:
        with pytest.raises(RecipeError, match=f"expands to {total} (jobs|variants)"):
            load_recipe(path)
    else:
        assert len(load_recipe(path).prompts) == total


@FAST
@given(n=st.integers(1, 20_000), cap=st.integers(1, 10_000))
def test_huge_lists_are_refused_by_count(tmp_path, n, cap):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + f'prompt: "p"\nsize: 64x64\nmax_jobs: {cap}\nseeds: [' + ", ".join(map(str, range(n))) + "]\n")
    if n > cap:
        with pytest.raises(RecipeError, match=f"`seeds` lists {n} seeds"):
            load_recipe(path)
    else:
        assert len(load_recipe(path).seeds) == n


# --- finding 1: short writes ---------------------------------------------------------------------


class FailingDisk:
    """The low-level write of `imagegen.fsutil`, failing after `budget` bytes: the write that
    crosses the budget is short (as a nearly full disk gives), the next one raises ENOSPC."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.real = os.write

    def __call__(self, fd: int, data) -> int:
        if self.budget <= 0:
            raise OSError(28, "No space left on device")
        n = min(len(data), self.budget)
        self.budget -= n
        return self.real(fd, bytes(data[:n]))


def writers(folder: Path):
    """Every kind of file imagegen writes, each as (final path, a call that writes it)."""
    import numpy as np
    from PIL import Image

    from imagegen import fsutil
    from imagegen.picks import write_picks
    from imagegen.thumbs import save_thumbnail_atomic
    from imagegen.upscale.writers import WRITERS

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = {
        "thumb.jpg": lambda p: save_thumbnail_atomic(image, p),
        "sheet.jpg": lambda p: fsutil.write_atomic(p, lambda f: image.save(f, format="JPEG", quality=90)),
        "image.png": lambda p: fsutil.write_atomic(p, lambda f: image.save(f, format="PNG")),
        "index.html": lambda p: fsutil.write_bytes_atomic(p, b"<html>" + b"x" * 50_000 + b"</html>"),
        "picks.txt": lambda p: write_picks(p, range(1, 3000)),
        "recipe.yaml": lambda p: fsutil.write_bytes_atomic(p, b"name: r\n" * 5000),
    }
    for fmt, writer in WRITERS.items():
        out[f"up.{fmt}"] = (lambda p, w=writer: fsutil.write_atomic(
            p, lambda f: w(f, iter([pixels[:48], pixels[48:]]), 80, 96, 3, "params", {"k": "v"})))
    return {folder / name: fn for name, fn in out.items()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(0, 40_000))
def test_short_writes_never_leave_a_partial_file_under_a_final_name(tmp_path, monkeypatch, budget):
    from imagegen import fsutil

    folder = tmp_path / str(budget)
    folder.mkdir()
    for path, write in writers(folder).items():
        path.write_bytes(b"OLD")
        monkeypatch.setattr(fsutil, "_os_write", FailingDisk(budget))
        try:
            write(path)
        except OSError as exc:
            assert exc.errno == 28
            assert path.read_bytes() == b"OLD", path.name  # untouched
        else:
            monkeypatch.setattr(fsutil, "_os_write", os.write)
            reference = folder / ("ref-" + path.name)
            write(reference)  # the complete file, written without a failing disk
            assert path.read_bytes() == reference.read_bytes(), path.name
            reference.unlink()
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_full_disk_is_one_line_exit_1_naming_what_to_do(piped_run, tmp_path, monkeypatch, capsys):
    import shutil

    from imagegen import fsutil

    run = tmp_path / "run"
    shutil.copytree(piped_run[1], run)
    monkeypatch.setattr(fsutil, "_os_write", FailingDisk(0))
    for command in (["pick", str(run), "1"], ["sheet", str(run)]):
        code = run_app(command)
        said = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(said) == 1 and "disk full" in said[0] and "run the same command" in said[0], said
    assert not (run / "picks.txt").exists() and not list((run / "sheets").glob("*.jpg"))


# --- finding 4: damaged images -------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:3000] if len(data) > 3000 else data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "bomb":  # a valid PNG that declares 60000x60000 (IHDR with a correct CRC)
        import zlib

        ihdr = b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
        chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
        path.write_bytes(data[:8] + chunk + data[33:])
    elif how == "flipped":  # same size, intact ends: only the sha256 sees it
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])


@pytest.mark.parametrize("how", ["truncated", "random", "bomb"])
def test_damaged_images_go_back_to_pending(piped_run, tmp_path, how):
    import shutil

    from imagegen.store import RunStore

    run = tmp_path / "run"
    shutil.copytree(piped_run[1], run)
    victim = sorted((run / "images").glob("*.png"))[0]
    damage(victim, how)
    with RunStore.open(run) as store:
        report = store.reconcile()
        assert len(report.damaged) == 1 and victim.name in report.damaged[0]
        assert store.counts()["pending"] == 1 and store.counts()["done"] == 1


@pytest.mark.parametrize("how", ["truncated", "random", "bomb", "flipped"])
def test_status_verify_reports_every_damaged_image(piped_run, tmp_path, capsys, how):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(piped_run[1], run)
    assert run_app(["status", str(run), "--verify"]) == 0
    victim = sorted((run / "images").glob("*.png"))[1]
    damage(victim, how)
    capsys.readouterr()
    assert run_app(["status", str(run), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "damaged: job 2" in out and "1/2 done images match" in out


def test_render_verify_renders_a_flipped_byte_image_again(piped_run, tmp_path, capsys):
    # A byte flipped mid-image keeps its size and end marker: only the sha256 tells. `render
    # --verify` compares every done image and renders the damaged one again; the others stay.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(piped_run[1], run)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(RENDER))
    first, victim = sorted((run / "images").glob("*.png"))
    good, kept = victim.read_bytes(), first.stat().st_mtime_ns
    with Image.open(victim) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    damage(victim, "flipped")
    assert run_app(["render", str(recipe), "--no-sheet"]) == 0  # the cheap start-up check cannot see it
    assert victim.read_bytes() != good
    assert run_app(["render", str(recipe), "--no-sheet", "--verify"]) == 0
    # the metadata holds a new render time, so compare pixels
    with Image.open(victim) as im:
        again = np.asarray(im.convert("RGB"), dtype=np.int16)
    # rendered again from the same seed (here in the test process, first in a subprocess: within
    # 1/255 for thread-count rounding); the undamaged image was not touched
    assert np.abs(again - pixels).max() <= 1 and first.stat().st_mtime_ns == kept
    capsys.readouterr()
    assert run_app(["status", str(run), "--verify"]) == 0


@FAST
@given(data=st.binary(max_size=4000), cut=st.integers(0, 4000))
def test_any_damaged_png_bytes_are_caught_without_pillow(tmp_path, data, cut):
    from imagegen.store import png_problem

    good = tmp_path / "good.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 20, 30)).save(good)
    raw = good.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(raw[: min(cut, len(raw) - 1)] + data)
    assert png_problem(good, 64, 64) is None
    if bad.read_bytes() != raw:
        looks_fine = png_problem(bad, 64, 64) is None
        assert not looks_fine or bad.read_bytes().endswith(raw[-12:])
