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

import pytest
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


def test_closed_stderr_pipe_does_not_kill_a_render(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(RENDER))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    proc = subprocess.run([sys.executable, "-m", "imagegen", "render", str(recipe), "--no-sheet"], cwd=tmp_path,
                          stdout=write, stderr=write, timeout=900)
    os.close(write)
    assert proc.returncode == 0
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 2
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert log.count('"event": "image"') == 2


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
