"""Run folder -> contact sheets, index.html and picks, through the CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from PIL import Image

from fakes import fake_opener
from imagegen.cli import run_app
from imagegen.picks import read_picks

RECIPE = """
name: sheets
model:
  checkpoint: builtin:tiny-sd15
prompt: "a {red|blue} cup"
seeds: 5
guidance: [3, 6]
size: 64x64
output: run
"""


@pytest.fixture()
def run(tmp_path, monkeypatch) -> Path:
    import imagegen.engine

    monkeypatch.setattr(imagegen.engine, "open_engine", fake_opener())
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    assert run_app(["render", str(path)]) == 0  # writes sheets at the end
    return tmp_path / "run"


def test_render_writes_sheets_and_index(run):
    pages = sorted((run / "sheets").glob("sheet-*.jpg"))
    assert len(pages) == 1 and (run / "sheets" / "index.html").exists()
    html = (run / "sheets" / "index.html").read_text()
    assert "../thumbs/0020-" in html and "../images/0020-" in html
    assert "http://" not in html and "https://" not in html  # self-contained: no CDN, no network
    assert len(list((run / "thumbs").glob("*.jpg"))) == 20
    with Image.open(run / "thumbs" / sorted(p.name for p in (run / "thumbs").glob("*.jpg"))[0]) as im:
        assert max(im.size) == 256


def test_sheet_layouts_and_bad_axis(run, capsys):
    assert run_app(["sheet", str(run), "--by", "prompt", "--per-page", "8"]) == 0
    assert len(list((run / "sheets").glob("sheet-*.jpg"))) >= 3
    assert run_app(["sheet", str(run), "--x", "guidance", "--y", "seed"]) == 0
    capsys.readouterr()
    assert run_app(["sheet", str(run), "--by", "cfg"]) == 2
    assert "unknown axis 'cfg'" in capsys.readouterr().err


def test_pick_add_remove_clear_from_and_errors(run, tmp_path, capsys):
    assert run_app(["pick", str(run), "12", "3-5"]) == 0
    assert read_picks(run / "picks.txt") == [3, 4, 5, 12]
    # a note written by hand survives the next pick command
    (run / "picks.txt").write_text((run / "picks.txt").read_text().replace("\n12\n", "\n12  # best light\n"))
    assert run_app(["pick", str(run), "5"]) == 0
    assert "12  # best light" in (run / "picks.txt").read_text()
    assert run_app(["pick", str(run), "4", "--remove"]) == 0
    assert read_picks(run / "picks.txt") == [3, 5, 12]
    before = (run / "picks.txt").read_text()
    capsys.readouterr()
    assert run_app(["pick", str(run), "7", "21"]) == 2
    assert "21 is not a job index; this run has 1-20" in capsys.readouterr().err
    assert (run / "picks.txt").read_text() == before  # nothing written
    exported = tmp_path / "downloaded.txt"
    exported.write_text("# from the browser: the whole set chosen there\n1\n2 # nice\n3\n")
    assert run_app(["pick", str(run), "--from", str(exported)]) == 0
    assert read_picks(run / "picks.txt") == [1, 2, 3]  # replaced, so un-picks in the browser count
    capsys.readouterr()
    assert run_app(["picks", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1" and lines[0].endswith(".png")
    import sqlite3

    with sqlite3.connect(run / "manifest.sqlite") as db:
        assert [r[0] for r in db.execute("SELECT idx FROM picks ORDER BY idx")] == [1, 2, 3]
    for bad in (tmp_path / "missing.txt", tmp_path):
        capsys.readouterr()
        assert run_app(["pick", str(run), "--from", str(bad)]) == 2
        assert "is not a file" in capsys.readouterr().err
    assert read_picks(run / "picks.txt") == [1, 2, 3]
    assert run_app(["pick", str(run), "--clear"]) == 0
    assert read_picks(run / "picks.txt") == []


def test_picks_show_in_sheet_items(run):
    from imagegen.sheets import sheet_items
    from imagegen.store import RunStore

    assert run_app(["pick", str(run), "2"]) == 0
    store = RunStore.open(run, create=False, lock=False)
    try:
        items = sheet_items(store)
    finally:
        store.close()
    assert [i.index for i in items if i.picked] == [2]
    assert items[0].axes["guidance"] == "3" and items[0].thumb.exists() and items[0].image.exists()


def test_sheet_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert run_app(["sheet", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_picks_follow_their_jobs_when_a_recipe_edit_moves_indices(run, tmp_path, capsys):
    from imagegen.store import RunStore

    store = RunStore.open(run, create=False, lock=False)
    try:
        ids = {r.index: r.id for r in store.rows()}
    finally:
        store.close()
    assert run_app(["pick", str(run), "1", "2", "12"]) == 0
    (run / "picks.txt").write_text((run / "picks.txt").read_text().replace("\n12\n", "\n12  # keeper\n"))
    recipe = tmp_path / "r.yaml"
    # a new first prompt variant shifts every index; seed 0 of "red" disappears
    recipe.write_text(recipe.read_text().replace('"a {red|blue} cup"', '"a {green|red|blue} cup"').replace("seeds: 5", "seeds: [1, 2, 3, 4]"))
    capsys.readouterr()
    assert run_app(["render", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "picks.txt follows 2 picked jobs" in err and f"1 (job {ids[1]})" in err
    store = RunStore.open(run, create=False, lock=False)
    try:
        new_index = {r.id: r.index for r in store.rows()}
    finally:
        store.close()
    assert read_picks(run / "picks.txt") == sorted([new_index[ids[2]], new_index[ids[12]]])
    assert f"orphaned pick 1 (job {ids[1]};" in (run / "picks.txt").read_text()
    assert f"{new_index[ids[12]]}  # keeper" in (run / "picks.txt").read_text()  # the note moved with its job
