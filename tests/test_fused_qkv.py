"""Fused QKV projections (what `--compile` turns on) and LoRA switches over them, eager on CPU:
fused output equals unfused within 1/255 (fp32; the fused matmul sums in another order), a LoRA
set reached through other sets equals a fresh engine's exactly, and the LoRA weight backup is
kept across switches instead of being copied again."""

from __future__ import annotations

import numpy as np
import pytest

from engine_fixtures import make_tiny_lora
from imagegen.engine import GenRequest, open_engine

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")


def reqs():
    return [GenRequest("a photo of a cat", "", 1, 64, 64, 4, 6.0, "Euler a"),
            GenRequest("a dog", "ugly", 2, 64, 64, 4, 6.0, "Euler a")]


def pixels(eng):
    return [np.asarray(r.image, dtype=np.int16) for r in eng.generate(reqs())]


def maxdiff(a, b) -> int:
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_fused_qkv_matches_unfused_and_lora_switches_equal_a_fresh_engine(tmp_path, family):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    a = make_tiny_lora(tmp_path / "a.safetensors", family, seed=3)
    b = make_tiny_lora(tmp_path / "b.safetensors", family, seed=4)
    plain = open_engine(f"builtin:tiny-{family}", device="cpu")
    unfused = pixels(plain)
    plain.set_loras([(str(a), 0.8)])
    unfused_a = pixels(plain)

    eng = open_engine(f"builtin:tiny-{family}", device="cpu")
    eng.fuse_qkv()
    procs = eng.pipeline.unet.attn_processors
    assert procs and all(isinstance(p, FusedAttnProcessor2_0) for p in procs.values())
    fused = pixels(eng)
    assert maxdiff(fused, unfused) <= 1  # stated tolerance across the two code paths: 1/255

    eng.set_loras([(str(a), 0.8)])
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in eng.pipeline.unet.attn_processors.values())
    with_a = pixels(eng)
    assert maxdiff(with_a, unfused_a) <= 1
    assert maxdiff(with_a, fused) > 0  # the LoRA reached the fused matrices
    backup = {k: v[0] for k, v in eng._backup.items()}
    eng.set_loras([(str(b), 0.8)])
    pixels(eng)
    eng.set_loras([(str(b), 0.5), (str(a), 0.8)])
    pixels(eng)
    eng.set_loras([(str(a), 0.8)])
    assert all(eng._backup[k][0] is w for k, w in backup.items())  # kept, not copied again
    assert maxdiff(pixels(eng), with_a) == 0  # exact: same weights, same code path
    eng.set_loras([])
    assert maxdiff(pixels(eng), fused) == 0  # originals restored bit for bit, fused copy refreshed

    fresh = open_engine(f"builtin:tiny-{family}", device="cpu")
    fresh.fuse_qkv()
    fresh.set_loras([(str(a), 0.8)])
    assert maxdiff(pixels(fresh), with_a) == 0  # a LoRA set reached through others = a fresh engine's
