"""`imagegen import`: imagegen images round-trip to a recipe that renders the same pixels;
A1111 infotext becomes a recipe with LoRAs found by AddNet hash and unknown fields kept."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import yaml
from PIL import Image

from imagegen.cli import run_app
from imagegen.plan import plan
from imagegen.recipe import load_recipe


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_imagegen_image_round_trips_to_the_same_pixels(tmp_path, capsys):
    pytest.importorskip("torch")
    from engine_fixtures import make_tiny_lora

    make_tiny_lora(tmp_path / "gold.safetensors", "sd15", seed=4)
    src = tmp_path / "src.yaml"
    src.write_text(textwrap.dedent("""
        name: src
        model: {checkpoint: "builtin:tiny-sd15"}
        loras: [{path: gold.safetensors, weight: 0.6}]
        prompt: 'a (red:1.2) cup \\(literal\\), {glass|clay} BREAK on a table'
        negative: "[blurry]"
        seeds: [7]
        size: 64x64
        steps: 3
        guidance: 5
        scheduler: DPM++ 2M
        clip_skip: 2
        emphasis: no-norm
        output: run
    """))
    assert run_app(["render", str(src), "--no-sheet"]) == 0
    first = sorted((tmp_path / "run" / "images").glob("*.png"))[0]
    out = tmp_path / "again.yaml"
    assert run_app(["import", str(first), "-o", str(out)]) == 0
    again = load_recipe(out)
    [job] = plan(again)
    assert first.name == f"{job.index:04d}-{job.id}.png"  # the same job content, so the same id
    text = out.read_text().replace("runs/", str(tmp_path / "runs") + "/")
    out.write_text(text)
    assert run_app(["render", str(out), "--no-sheet"]) == 0
    [re_rendered] = list((tmp_path / "runs" / again.name / "images").glob("*.png"))
    # the first render ran in a batch of 2, this one alone: batches agree within 1/255 (README)
    assert np.abs(pixels(re_rendered) - pixels(first)).max() <= 1
    assert run_app(["import", str(first), "-o", str(out)]) == 2  # no silent overwrite


A1111 = """a (gold foil:1.3) vase, [blurry], BREAK studio <lora:kohya_style:0.8>
Negative prompt: lowres, watermark
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: 0123456789, Model: dreamshaper_8, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires upscaler: 4x-UltraSharp, Lora hashes: "kohya_style: {hash}", ADetailer model: face_yolov8n.pt, Version: v1.10.1"""


def test_a1111_infotext_becomes_a_recipe(tmp_path, capsys):
    pytest.importorskip("torch")
    from engine_fixtures import make_tiny_lora
    from imagegen.metadata import addnet_hash

    loras = tmp_path / "loras"
    loras.mkdir()
    renamed = make_tiny_lora(loras / "renamed-on-disk.safetensors", "sd15", seed=5)  # found by hash, not name
    info = tmp_path / "info.txt"
    info.write_text(A1111.format(hash=addnet_hash(renamed)[:12]))
    out = tmp_path / "r.yaml"
    assert run_app(["import", str(info), "-o", str(out), "--lora-dir", str(loras), "--model", "builtin:tiny-sd15"]) == 0
    text = out.read_text()
    data = yaml.safe_load(text)
    assert data["prompt"] == "a (gold foil:1.3) vase, [blurry], BREAK studio"
    assert data["negative"] == "lowres, watermark" and data["seeds"] == [1234] and data["size"] == "512x768"
    assert data["steps"] == 28 and data["guidance"] == 6.5 and data["scheduler"] == "DPM++ 2M Karras" and data["clip_skip"] == 2
    assert data["loras"] == [{"path": str(renamed), "weight": 0.8, "name": "kohya_style"}]
    for kept in ("ADetailer model: face_yolov8n.pt", "Model hash: 0123456789", "Version: v1.10.1"):
        assert f"#   {kept}" in text, kept
    # the hires keys become `hires:`; an upscaler model by name is a file for the person to point at
    assert data["hires"] == {"scale": 2.0, "upscaler": "4x-UltraSharp.pth", "denoise": 0.45}
    assert "hires upscaler `4x-UltraSharp`" in text and "Hires upscale" not in text
    recipe = load_recipe(out, check_files=False)
    [job] = plan(recipe)
    assert [(lu.name, lu.weight) for lu in job.loras] == [("kohya_style", 0.8)]
    assert (job.hires.width, job.hires.height, job.hires.steps, job.hires.scheduler) == (1024, 1536, 28, "DPM++ 2M Karras")
    # A1111 >= 1.9 reads a missing Schedule type as the sampler's default: DPM++ 2M means Karras there
    info.write_text(A1111.format(hash="000000000000").replace("Schedule type: Karras, ", ""))
    assert run_app(["import", str(info), "-o", str(out), "--force"]) == 0
    data = yaml.safe_load(out.read_text())
    assert data["scheduler"] == "DPM++ 2M Karras" and data["model"]["checkpoint"] == "dreamshaper_8.safetensors"
    err = capsys.readouterr().err
    assert "model `dreamshaper_8`" in err and "LoRA `kohya_style`" in err


def test_import_refuses_files_without_metadata(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert run_app(["import", str(plain)]) != 0
    txt = tmp_path / "x.txt"
    txt.write_text("just a prompt")
    assert run_app(["import", str(txt)]) != 0
