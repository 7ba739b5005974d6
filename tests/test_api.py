"""The Python API: the README's example is examples/api_example.py, and it runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.api import load_recipe, pick, plan
from imagegen.errors import RecipeError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "api_example.py"


def test_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert EXAMPLE.read_text(encoding="utf-8") in blocks


def test_the_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # IMAGEGEN_CACHE: the session's tiny models (conftest)
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "4 jobs; job 1 is" in out and "rendered 4/4" in out and "rendered 4, failed 0" in out
    assert "picks: [1, 3, 4]" in out and "refused: " in out and "99" in out
    run = tmp_path / "runs" / "api-demo"
    assert len(list((run / "images").glob("*.png"))) == 4 and (run / "sheets" / "index.html").is_file()
    upscaled = sorted(p.name for p in (run / "upscaled").glob("*-128w.png"))
    assert [n.split("-")[0] for n in upscaled] == ["0001", "0003", "0004"]
    assert f"upscaled: {upscaled}" in out


def test_recipe_from_a_dict_is_validated_like_a_file(tmp_path):
    recipe = load_recipe({"name": "d", "model": {"checkpoint": "builtin:tiny-sd15"}, "prompt": "a {b|c}", "seeds": 3},
                         base_dir=tmp_path)
    assert len(plan(recipe)) == 6 and recipe.output == Path("runs") / "d"
    with pytest.raises(RecipeError) as info:
        load_recipe({"name": "d", "model": {"checkpoint": "builtin:tiny-sd15"}, "prompt": "x", "stepz": 3})
    assert info.value.problems == ["<dict>:5:1: unknown key `stepz`; did you mean `steps`?"]


def test_pick_on_a_folder_that_is_not_a_run(tmp_path):
    from imagegen.errors import InputError

    with pytest.raises(InputError):
        pick(tmp_path, 1)
