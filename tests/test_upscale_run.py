"""`imagegen upscale RUN`: the whole flow, render -> pick -> upscale the picks only."""

from __future__ import annotations

import textwrap

import torch

from fakes import fake_opener
from imagegen.cli import run_app
from imagegen.metadata import parse_parameters
from imagegen.upscale import read_metadata
from imagegen.upscale.archs.compact.net import SRVGGNetCompact


def make_run(tmp_path, monkeypatch, upscale: str):
    import imagegen.engine

    monkeypatch.setattr(imagegen.engine, "open_engine", fake_opener())
    torch.manual_seed(0)
    net = SRVGGNetCompact(num_feat=4, num_conv=1, scale=4)
    torch.save({"params_ema": net.state_dict()}, tmp_path / "x4.pth")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""
        name: up
        model: {checkpoint: builtin:tiny-sd15}
        prompt: a cup
        seeds: 4
        size: 64x64
        output: run
    """) + upscale)
    assert run_app(["render", str(recipe), "--no-sheet"]) == 0
    return tmp_path / "run"


def test_upscale_run_uses_recipe_settings_picks_only_and_resumes(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path, monkeypatch, "upscale: {model: x4.pth, width: 200, format: png}\n")
    assert run_app(["pick", str(run), "2", "4"]) == 0
    capsys.readouterr()
    assert run_app(["upscale", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.index("model x4: 64x64 -> 256x256") < out.index("lanczos: 256x256 -> 200x200") < out.index("wrote ")
    made = sorted((run / "upscaled").glob("*.png"))
    assert [p.name.split("-")[0] for p in made] == ["0002", "0004"] and all(p.name.endswith("-200w.png") for p in made)
    from PIL import Image

    with Image.open(made[0]) as im:
        assert im.size == (200, 200)
    meta = read_metadata(made[0])
    params = parse_parameters(meta["parameters"])
    assert params["Seed"] == "1" and params["Final size"] == "200x200" and params["Upscaler"]
    assert meta["imagegen"]["index"] == 2 and meta["imagegen"]["upscale"]
    # again: nothing redone; command-line options override the recipe
    mtimes = [p.stat().st_mtime_ns for p in made]
    assert run_app(["upscale", str(run)]) == 0
    assert [p.stat().st_mtime_ns for p in made] == mtimes
    assert run_app(["upscale", str(run), "--scale", "2", "--format", "tif"]) == 0
    assert len(list((run / "upscaled").glob("*-128w.tif"))) == 2


def test_upscale_run_errors_are_clear(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path, monkeypatch, "")
    assert run_app(["upscale", str(run)]) == 2
    assert "no picks" in capsys.readouterr().err
    assert run_app(["pick", str(run), "1"]) == 0
    assert run_app(["upscale", str(run)]) == 2
    said = capsys.readouterr().err
    assert "no upscale model" in said
    assert "no target size" in said and "upscale:\n    model:" in said  # all at once, with how to add them
    assert run_app(["upscale", str(run), "--model", str(tmp_path / "x4.pth")]) == 2
    assert "no target size" in capsys.readouterr().err


def test_reproduce_refuses_upscaled_and_bad_paths(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path, monkeypatch, "upscale: {model: x4.pth, scale: 2, format: png}\n")
    assert run_app(["pick", str(run), "1"]) == 0
    assert run_app(["upscale", str(run)]) == 0
    [big] = (run / "upscaled").glob("*.png")
    capsys.readouterr()
    assert run_app(["reproduce", str(big)]) == 2
    assert "an upscaled image; reproduce its source render instead (0001-" in capsys.readouterr().err
    assert run_app(["reproduce", str(tmp_path / "nope.png")]) == 2
    assert "file not found" in capsys.readouterr().err
    # a TIFF delivery carries the same provenance (in its tags): named as an upscale, with its source
    assert run_app(["upscale", str(run), "--scale", "2", "--format", "tif"]) == 0
    [tif] = (run / "upscaled").glob("*.tif")
    capsys.readouterr()
    assert run_app(["reproduce", str(tif)]) == 2
    said = capsys.readouterr().err
    first = sorted((run / "images").glob("*.png"))[0]
    assert "an upscaled image; reproduce its source render instead (0001-" in said, said
    assert f"imagegen reproduce {first}" in said and "no imagegen metadata" not in said
    src = sorted((run / "images").glob("*.png"))[0]
    assert run_app(["reproduce", str(src), "--out", str(tmp_path / "noext")]) == 2
    assert run_app(["reproduce", str(src), "--out", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_app(["upscale", str(run), "--out", str(src)]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
