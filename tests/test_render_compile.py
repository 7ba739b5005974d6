"""`render.compile` (recipe and defaults file) and the padded last batch of a compiled engine.

The padding test drives the real render path with a real tiny engine marked as compiled (the
padding depends on `Engine.compiled`, not on inductor, whose compile takes minutes here; the
compiled kernels themselves are tested in test_compile.py)."""

from __future__ import annotations

import numpy as np
import pytest

from imagegen.cli import run_app
from imagegen.errors import InputError, RecipeError
from imagegen.metadata import read_provenance
from imagegen.recipe import load_defaults_file, load_recipe
from imagegen.render import RenderOptions, render_recipe
from imagegen.render.run import compile_wanted
from imagegen.store import RunStore
from test_render import RECIPE, pixels, write_recipe


def test_render_compile_key_in_the_recipe(tmp_path):
    assert load_recipe(write_recipe(tmp_path)).render.compile is None
    assert load_recipe(write_recipe(tmp_path, extra="render:\n  compile: true\n")).render.compile is True
    assert load_recipe(write_recipe(tmp_path, extra="render: {compile: false}\n")).render.compile is False
    with pytest.raises(RecipeError, match=r"r\.yaml:16:12: `render.compile` must be true or false, got \"yes please\""):
        load_recipe(write_recipe(tmp_path, extra="render:\n  compile: yes please\n"))
    with pytest.raises(RecipeError, match="compil.*compile"):
        load_recipe(write_recipe(tmp_path, extra="render:\n  compil: true\n"))
    with pytest.raises(RecipeError, match="belongs under `render:`"):  # a top-level `compile:` points at its section
        load_recipe(write_recipe(tmp_path, extra="compile: true\n"))


def test_defaults_file(tmp_path):
    f = tmp_path / "defaults.yaml"
    assert load_defaults_file(f).compile is None  # no file: nothing set
    f.write_text("# machine settings\nrender:\n  compile: true\n")
    assert load_defaults_file(f).compile is True
    f.write_text("")
    assert load_defaults_file(f).compile is None
    for text, message in [("render:\n  compile: 1\n", r"defaults\.yaml:2:\d+: `render.compile` must be true or false"),
                          ("steps: 20\n", r"defaults\.yaml:1:1: .*`steps`"),
                          ("render: [\n", "YAML syntax error"),
                          ("- a\n", "must be a mapping")]:
        f.write_text(text)
        with pytest.raises(RecipeError, match=message):
            load_defaults_file(f)


def test_compile_precedence_flag_then_recipe_then_defaults_file(tmp_path, monkeypatch):
    f = tmp_path / "defaults.yaml"
    monkeypatch.setenv("IMAGEGEN_DEFAULTS", str(f))
    plain = load_recipe(write_recipe(tmp_path))
    off = load_recipe(write_recipe(tmp_path, extra="render: {compile: false}\n"))
    on = load_recipe(write_recipe(tmp_path, extra="render: {compile: true}\n"))
    assert not compile_wanted(plain, RenderOptions())  # nothing anywhere: eager
    f.write_text("render: {compile: true}\n")
    assert compile_wanted(plain, RenderOptions())  # the defaults file
    assert not compile_wanted(off, RenderOptions())  # the recipe over the file
    assert not compile_wanted(plain, RenderOptions(compile=False))  # --no-compile over both
    f.write_text("render: {compile: false}\n")
    assert compile_wanted(on, RenderOptions())
    assert compile_wanted(plain, RenderOptions(compile=True))


def test_bad_defaults_file_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    f = tmp_path / "defaults.yaml"
    f.write_text("render:\n  compile: maybe\n")
    monkeypatch.setenv("IMAGEGEN_DEFAULTS", str(f))
    assert run_app(["render", str(write_recipe(tmp_path)), "--no-sheet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "defaults.yaml:2:" in err[0] and "`render.compile`" in err[0]
    assert run_app(["render", str(write_recipe(tmp_path)), "--no-sheet", "--no-compile", "--limit", "1"]) == 0


def test_workers_refuse_a_recipe_that_asks_to_compile(tmp_path, capsys):
    path = write_recipe(tmp_path, extra="render: {compile: true}\n")
    assert run_app(["render", str(path), "--workers", "2", "--device", "cpu", "--no-sheet"]) == 2
    assert "`render.compile`" in capsys.readouterr().err
    assert not list((tmp_path / "run" / "images").glob("*.png"))


def _render(tmp_path, name, seeds, compiled):
    from imagegen.engine import open_engine

    seen: list[int] = []

    class Marked:  # the real engine, its `compiled` flag set: what Engine.compile leaves behind
        def __init__(self, real):
            self.real = real
            real.compiled = compiled

        def __getattr__(self, attr):
            return getattr(self.real, attr)

        def generate(self, requests):
            seen.append(len(requests))
            return self.real.generate(requests)

    text = RECIPE.replace("seeds: [11, 12, 13]", f"seeds: {seeds}").replace("output: run", f"output: {name}")
    recipe = load_recipe(write_recipe(tmp_path, text=text))
    store = RunStore.open(tmp_path / name)
    try:
        summary = render_recipe(recipe, store, options=RenderOptions(batch_size=4),
                                open_engine=lambda *a, **k: Marked(open_engine(*a, **k)))
    finally:
        store.close()
    return summary, seen, sorted((tmp_path / name / "images").glob("*.png"))


def test_compiled_engine_pads_the_last_batch_and_drops_the_padding(tmp_path):
    # 2 prompts x 3 seeds = 6 jobs in one group at batch 4: batches of 4 and 2, the 2 padded to 4.
    summary, seen, images = _render(tmp_path, "padded", "[11, 12, 13]", compiled=True)
    assert seen == [4, 4] and summary.rendered == 6 and summary.failed == 0 and len(images) == 6
    assert read_provenance(images[0])["compiled"] is True
    # The same jobs among 8 (2 x 4 seeds): batches of 4 real jobs, no padding. Each image is
    # made from its own seed at the same batch shape, so the padded batch's real images are
    # exactly the ones a full batch makes (same kernels: an exact comparison).
    full_summary, full_seen, full_images = _render(tmp_path, "full", "[11, 12, 13, 14]", compiled=False)
    assert full_seen == [4, 4] and full_summary.rendered == 8
    by_id = {p.stem.split("-", 1)[1]: p for p in full_images}
    assert all(p.stem.split("-", 1)[1] in by_id for p in images)  # same job ids: padding never reaches the plan
    for p in images:
        np.testing.assert_array_equal(pixels(p), pixels(by_id[p.stem.split("-", 1)[1]]))
    assert read_provenance(full_images[0])["compiled"] is False


def test_eager_engine_is_not_padded(tmp_path):
    summary, seen, images = _render(tmp_path, "eager", "[11, 12, 13]", compiled=False)
    assert seen == [4, 2] and len(images) == 6
