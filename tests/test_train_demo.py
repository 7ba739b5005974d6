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
