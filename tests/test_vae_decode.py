"""The VAE decode plan (engine/vae_decode.py): the choice logic for every case, and on CPU the
mechanism itself (a bf16 decode forced on the tiny SDXL model) with everything put back after."""

from __future__ import annotations

import numpy as np
import pytest

from imagegen.engine import GenRequest, HiresRequest, open_engine
from imagegen.engine.vae_decode import DecodePlan, decode_plan

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("device,family,vae,upcast,bf16,want", [
    ("cpu", "sdxl", "fp32", True, False, (None, False)),  # CPU: as loaded, pixels unchanged
    ("cpu", "sdxl", "fp16", True, True, (None, False)),
    ("cuda", "sdxl", "fp16", True, True, ("bf16", True)),  # the original SDXL VAE: bf16 instead of fp32
    ("cuda:1", "sdxl", "fp16", True, False, (None, True)),  # no bf16: diffusers' fp32 upcast, in slices
    ("cuda", "sdxl", "fp16", False, True, ("fp16", True)),  # the fp16-safe VAE stays fp16
    ("cuda", "sdxl", "bf16", True, True, (None, True)),
    ("cuda", "sdxl", "fp32", True, True, (None, True)),
    ("cuda", "sd15", "fp16", True, True, (None, False)),  # SD1.5 decodes as diffusers does
])
def test_decode_plan(device, family, vae, upcast, bf16, want):
    plan = decode_plan(device, family, vae, upcast, bf16)
    assert (plan.dtype, plan.slicing) == want and plan.reason


def test_cpu_engine_keeps_the_loaded_decode():
    eng = open_engine("builtin:tiny-sdxl", device="cpu")
    assert eng.decode_plan() == DecodePlan(None, False, eng.decode_plan().reason)


def _pixels(results):
    return [np.asarray(r.image, dtype=np.int16) for r in results]


def test_bf16_decode_mechanism_on_cpu():
    """Forced on CPU (where the plan never picks it), the bf16 decode runs the real pipeline:
    the VAE converted once to bf16 with diffusers' upcast off, the fp32 latents cast to it, one
    latent at a time, a hires pass's encode too; the UNet untouched, nothing left wrapped."""
    eng = open_engine("builtin:tiny-sdxl", device="cpu")
    vae = eng.pipeline.vae
    hires = HiresRequest(96, 96, "lanczos", 0.5, 2, "Euler a")  # decode, resize, encode again, decode
    reqs = [GenRequest("a cat", "", 1, 64, 64, 3, 5.0, "Euler a", hires=hires),
            GenRequest("a dog", "ugly", 2, 64, 64, 3, 5.0, "Euler a", hires=hires)]
    fp32 = _pixels(eng.generate(reqs))
    seen = []
    vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(("dec", a[0].dtype, a[0].shape[0])))
    vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(("enc", a[0].dtype, a[0].shape[0])))
    eng.set_decode_plan(DecodePlan("bf16", True, "test"))
    assert vae.dtype == torch.bfloat16 and vae.config.force_upcast is False and vae.use_slicing is True
    bf16 = _pixels(eng.generate(reqs))
    assert {k for k, _, _ in seen} == {"dec", "enc"}
    assert all(d == torch.bfloat16 for _, d, _ in seen) and all(n == 1 for k, _, n in seen if k == "dec")
    assert vae.dtype == torch.bfloat16 and eng.pipeline.unet.dtype == torch.float32
    assert "decode" not in vae.__dict__ and "encode" not in vae.__dict__
    diff = max(int(np.abs(a - b).max()) for a, b in zip(fp32, bf16))
    # Stated tolerance for the tiny random SDXL VAE on CPU (bf16 keeps 8 mantissa bits; the
    # hires pass decodes, re-encodes and decodes again, so differences pass through all three).
    assert 0 < diff <= 12, diff  # measured: 9 (max 4, mean 0.45 without the hires pass)
    assert _pixels(eng.generate(reqs))[0].tolist() == bf16[0].tolist()  # converted once: the same again
