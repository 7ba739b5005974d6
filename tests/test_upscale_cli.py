"""`imagegen upscale` end to end on a tiny random-weight compact model (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

import imagegen.cli.upscale  # noqa: F401  (registers the command on `app`)
from imagegen.cli.app import app, run_app
from imagegen.upscale import read_metadata
from imagegen.upscale.archs.compact.net import SRVGGNetCompact


@pytest.fixture()
def files(tmp_path):
    torch.manual_seed(0)
    net = SRVGGNetCompact(num_feat=4, num_conv=1, scale=4)
    model = tmp_path / "tiny-general-x4v3.pth"
    torch.save({"params": net.state_dict()}, model)
    srcs = []
    for i, size in enumerate([(40, 30), (31, 47)]):
        rng = np.random.default_rng(i)
        img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"prompt {i}\nSteps: 4, Seed: {i}")
        path = tmp_path / f"{i:04d}-job{i}.png"
        Image.fromarray(img).save(path, pnginfo=info)
        srcs.append(path)
    return model, srcs


def test_cli_upscales_prints_plan_and_resumes(tmp_path, files):
    model, srcs = files
    out = tmp_path / "up"
    args = ["upscale", *map(str, srcs), "--model", str(model), "--width", "150", "--out", str(out), "--tile", "16"]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "model x4: 40x30 -> 160x120" in res.output and "lanczos: 160x120 -> 150x112" in res.output
    assert "2 written, 0 already there" in res.output
    first = out / "0000-job0-150w.tif"
    second = out / "0001-job1-150w.tif"
    with Image.open(first) as a, Image.open(second) as b:
        assert a.size == (150, 112) and b.size == (150, 227)
    meta = read_metadata(first)
    assert meta["parameters"].startswith("prompt 0\nSteps: 4, Seed: 0, Upscaler: tiny-general-x4v3, Upscaler hash: ")
    stamp = first.stat().st_mtime_ns
    # A second run finds both outputs and does no work.
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "0 written, 2 already there" in res.output and "exists, skip" in res.output
    assert first.stat().st_mtime_ns == stamp
    # PNG and JPEG outputs by --format, with --scale.
    res = runner.invoke(app, ["upscale", str(srcs[0]), "-m", str(model), "--scale", "2", "-o", str(out), "-f", "png"])
    assert res.exit_code == 0, res.output
    with Image.open(out / "0000-job0-80w.png") as im:
        assert im.size == (80, 60) and "Final size: 80x60" in im.info["parameters"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--scale", "2", "--width", "100"], "exactly one of --scale, --width, --height"),
        (["--scale", "2", "--format", "webp"], "`--format` must be one of tif, png, jpg"),
        (["--scale", "0.5"], "`scale` must be a number >= 1"),
        (["--scale", "2", "--tile", "8"], "`--tile` must be 0 (whole image, no tiling) or at least 16"),
    ],
)
def test_cli_argument_errors(files, capsys, extra, message):
    model, srcs = files
    code = run_app(["upscale", str(srcs[0]), "--model", str(model), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model_and_image(tmp_path, files, capsys):
    model, srcs = files
    assert run_app(["upscale", str(srcs[0]), "--scale", "2"]) == 2
    assert "`--model` is required" in capsys.readouterr().err
    assert run_app(["upscale", str(tmp_path / "nope.png"), "--model", str(model), "--scale", "2"]) == 2
    assert "`IMAGE` not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    assert run_app(["upscale", str(srcs[0]), "--model", str(bad), "--scale", "2"]) == 2
    assert "bad.pth: cannot read weight file" in capsys.readouterr().err


def test_jpeg_too_big_for_memory_is_refused_before_model_work(files, capsys, monkeypatch):
    import imagegen.upscale.pipeline as pipeline

    model, srcs = files
    monkeypatch.setattr(pipeline, "available_memory", lambda: 10_000)  # 10 kB "free"
    assert run_app(["upscale", str(srcs[0]), "--model", str(model), "--scale", "4", "--format", "jpg"]) == 2
    assert "use tif or png, which stream" in capsys.readouterr().err
    assert not list(srcs[0].parent.glob("*.jpg"))
