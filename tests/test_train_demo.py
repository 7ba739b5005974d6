"""`tools/train_demo.py` at a tiny scale: every stage runs (sr and decoder in their side
processes), and what it writes is what the loaders take: `demo_components`, the LoRA check and
the upscaler loader. Quality is the bench's business (bench/demo_quality.py --weights DIR)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "train_demo.py"


def train(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--scale", "0.002", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_unknown_stage_is_one_line_and_exit_2(tmp_path):
    r = train(tmp_path, "--stages", "vae,unett")
    assert r.returncode == 2
    assert "unknown stage 'unett'" in r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_budget_is_one_line_and_exit_2(tmp_path, value):
    r = train(tmp_path, "--minutes", value)
    assert r.returncode == 2
    assert "--minutes: must be 0 (no budget) or more" in r.stderr
    assert not any(tmp_path.iterdir())


def test_fit_steps_shortens_only_what_does_not_fit():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    td = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(td)
    # 500 of 8000 steps in 100 s (0.2 s/step): 2000 s left holds 10000 more, so all 8000 fit
    assert td.fit_steps(8000, 500, 100.0, 2000.0) == 8000
    # 1000 s left holds 5000 more steps: the schedule ends at 5500
    assert td.fit_steps(8000, 500, 100.0, 1000.0) == 5500
    # nothing left (or the deadline passed): end at the step reached, never before it
    assert td.fit_steps(8000, 500, 100.0, 0.0) == 500
    assert td.fit_steps(8000, 500, 100.0, -50.0) == 500
    assert td.fit_steps(8000, 0, 0.0, 10.0) == 8000  # nothing measured yet: unchanged


@pytest.mark.slow
def test_every_stage_writes_files_the_loaders_take(tmp_path):
    import torch
    from safetensors.torch import load_file

    from imagegen.engine.builtin import demo_components
    from imagegen.modelfiles import check_lora
    from imagegen.upscale.model import load_upscaler

    r = train(tmp_path, "--stages", "vae")
    assert r.returncode == 0, r.stderr[-2000:]
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    before = load_file(str(vae_file))

    r = train(tmp_path, "--stages", "sr,text,unet,lora,decoder", "--threads", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sr: started beside" in r.stdout and "decoder: started beside" in r.stdout
    assert not list(tmp_path.rglob("*.part"))  # every file was renamed into place

    after = load_file(str(vae_file))
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec
    assert all(torch.equal(before[k], after[k]) for k in enc)  # the decoder stage keeps the encoder bit for bit
    assert any(not torch.equal(before[k], after[k]) for k in dec)

    parts = demo_components("cpu", folder=tmp_path)
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(parts)
    check_lora(tmp_path / "demo-outline.safetensors", "sd15")
    up = load_upscaler(tmp_path / "demo-x4.pth", device="cpu")
    assert (up.arch, up.scale) == ("SRVGGNetCompact", 4)
    y = up(torch.rand(1, 3, 8, 8))
    assert y.shape == (1, 3, 32, 32)

    # a budget already spent: the UNet's schedule (16 steps at this scale) ends at its first
    # check, step 2, which is probed and saved, and the file still loads
    unet_file = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.unlink()
    r = train(tmp_path, "--stages", "unet", "--minutes", "0.0001")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the --minutes budget leaves room for 2 steps" in r.stdout
    assert "unet 2 probe colour" in r.stdout and "unet 16" not in r.stdout  # no step past 2
    assert unet_file.exists()
    assert "unet" in demo_components("cpu", folder=tmp_path)
