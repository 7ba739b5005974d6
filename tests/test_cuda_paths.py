"""Failure paths that only a GPU produces, injected on the tiny real models with forward hooks
that raise what CUDA raises (torch.OutOfMemoryError, cuBLAS RuntimeErrors)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from engine_fixtures import make_tiny_lora
from imagegen.engine import EngineDeviceError, EngineOOM, GenRequest, open_engine
from imagegen.engine.device_errors import classify

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")



def req(seed=1, size=(64, 64), steps=4) -> GenRequest:
    return GenRequest("a photo of a cat", "", seed, size[0], size[1], steps, 6.0, "Euler a")


def px(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_classify_device_errors():
    assert classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    assert classify(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")) == "oom"
    assert classify(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")) == "oom"
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) == "sticky"
    assert classify(RuntimeError("CUDA error: device-side assert triggered")) == "sticky"
    assert classify(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert classify(ValueError("out of memory")) is None  # only torch's RuntimeErrors carry these


def test_vae_decode_oom_is_retried_alone_in_slices(sd15):
    """An OOM in the batched decode keeps the denoised latents: the UNet runs once per step,
    the decode again one image at a time, and the images match a batch that never failed."""
    reqs = [req(seed=1), req(seed=2)]
    clean = sd15.generate(reqs)
    unet_calls, decoder_batches = [], []

    def oom_on_batch(module, args):
        decoder_batches.append(args[0].shape[0])
        if args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        assert sys.exc_info() == (None, None, None)  # the retry runs outside the except block

    h1 = sd15.pipeline.vae.decoder.register_forward_pre_hook(oom_on_batch)
    h2 = sd15.pipeline.unet.register_forward_pre_hook(lambda m, a: unet_calls.append(1))
    try:
        out = sd15.generate(reqs)
    finally:
        h1.remove()
        h2.remove()
    assert len(unet_calls) == 4  # 4 steps, denoised once
    assert decoder_batches == [2, 1, 1]
    assert not sd15.pipeline.vae.use_slicing and "decode" not in vars(sd15.pipeline.vae)
    for a, b in zip(out, clean):
        assert int(np.abs(px(a.image) - px(b.image)).max()) <= 1  # batched vs sliced conv: stated tolerance


def test_cublas_alloc_failed_is_out_of_memory(sd15):
    def fail(module, args):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    handle = sd15.pipeline.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(EngineOOM, match="out of memory rendering 2 images at 64x64") as info:
            sd15.generate([req(), req(seed=2)])
    finally:
        handle.remove()
    assert info.value.__context__ is None  # raised outside the except block: nothing holds the traceback
    assert sd15.generate([req()])[0].error is None


def test_sticky_cuda_error_is_a_device_error(sd15):
    def fail(module, args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    handle = sd15.pipeline.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(EngineDeviceError, match="illegal memory access"):
            sd15.generate([req()])
    finally:
        handle.remove()


def test_oom_while_fusing_loras_is_engine_oom(sd15, tmp_path):
    lora = make_tiny_lora(tmp_path / "a.safetensors", "sd15", seed=3)
    clean = sd15.generate([req()])[0].image
    original = sd15.pipeline.fuse_lora

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory while fusing")

    sd15.pipeline.fuse_lora = oom
    try:
        with pytest.raises(EngineOOM, match="fusing 1 LoRA"):
            sd15.set_loras([(str(lora), 1.0)])
    finally:
        del sd15.pipeline.fuse_lora
    assert sd15.loras == ()
    assert int(np.abs(px(sd15.generate([req()])[0].image) - px(clean)).max()) == 0  # weights restored
    sd15.set_loras([(str(lora), 1.0)])
    assert sd15.loras and sd15.generate([req()])[0].error is None
    sd15.set_loras([])


# ---------------------------------------------------------------------------------------------
# The upscaler's tiles


class _OomOnce:
    """A real upscaler that raises torch's out-of-memory error on its first batch of 2 and
    records whether each call ran inside an `except` block."""

    def __init__(self, up):
        self.inner = up
        self.calls: list[tuple[tuple[int, ...], bool]] = []
        self.failed = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch):
        self.calls.append((tuple(batch.shape), sys.exc_info()[0] is not None))
        if batch.shape[0] > 1 and not self.failed:
            self.failed = True
            raise torch.OutOfMemoryError("test: pretend the batch does not fit")
        return self.inner(batch)


def test_upscaler_oom_retry_runs_outside_the_except_block(tmp_path):
    from test_upscale import compact, run, save, smooth_image
    from imagegen.upscale import load_upscaler
    from imagegen.upscale.tiling import TileConfig, Tiler, layout

    up = load_upscaler(save(compact(nconv=2, seed=9), tmp_path / "m.pth", "compact"), device="cpu")
    img = smooth_image(60, 50, seed=10)
    wrapped = _OomOnce(up)
    tiler = Tiler(wrapped)
    out = np.concatenate(list(tiler.strips(img, TileConfig(tile=32, overlap=8, margin=2, batch=2))))
    assert wrapped.failed and not any(inside for _, inside in wrapped.calls)
    tile_w = layout(60, 32, 8)[0]  # 60 px split evenly into tiles of at most 32
    assert all(shape[-1] == tile_w for shape, _ in wrapped.calls)  # one OOM halves the batch, not the tiles
    assert tiler.batch_cap == 1
    ref = run(up, img, 32)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


class _CudaLooking:
    """A real upscaler that reports a CUDA device (for the tile-size arithmetic only)."""

    def __init__(self, up):
        self.inner = up
        self.device = "cuda:0"

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tile_plan_counts_cached_blocks_as_free(tmp_path, monkeypatch):
    """After the first image PyTorch keeps its blocks cached: mem_get_info reports less free
    memory, yet the tile plan for the same image must not change."""
    from test_upscale import compact, save
    from imagegen.upscale import load_upscaler
    from imagegen.upscale.tiling import choose_config

    up = _CudaLooking(load_upscaler(save(compact(nconv=2, seed=9), tmp_path / "m.pth", "compact"), device="cpu"))
    gib = 1 << 30
    state = {"free": 6 * gib, "reserved": 1 * gib, "allocated": 1 * gib}  # fresh: only the weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (state["free"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: state["allocated"])
    first = choose_config(up, 1536, 1024, None)
    state.update(free=1 * gib, reserved=6 * gib)  # after one image: 5 GiB cached, same allocation
    assert choose_config(up, 1536, 1024, None) == first
    state.update(free=0, reserved=7 * gib)
    assert choose_config(up, 1536, 1024, None) == first


# ---------------------------------------------------------------------------------------------
# The render loop: OOM policy per size, failure streaks, sticky errors, LoRA fusing


def _render_with_hook(tmp_path, hook, *, extra="", text=None, batch_size=None, patch=None):
    """Render the test recipe with `hook` as a forward pre-hook on the real engine's UNet."""
    from test_render import write_recipe
    from imagegen.recipe import load_recipe
    from imagegen.render import RenderOptions, render_recipe
    from imagegen.store import RunStore

    events = []

    def opener(*a, **k):
        eng = open_engine(*a, **k)
        eng.pipeline.unet.register_forward_pre_hook(hook)
        if patch:
            patch(eng)
        return eng

    recipe = load_recipe(write_recipe(tmp_path, extra=extra, text=text))
    store = RunStore.open(tmp_path / "run")
    try:
        try:
            summary = render_recipe(recipe, store, on_event=events.append, open_engine=opener,
                                    options=RenderOptions(batch_size=batch_size))
        except Exception as exc:  # returned for the test to look at
            summary = exc
        return summary, store.counts(), events
    finally:
        store.close()


def test_oom_halves_only_the_size_that_ran_out(tmp_path):
    from test_render import RECIPE

    seen = []

    def hook(module, args):
        sample = args[0]
        seen.append((sample.shape[-1] * 8, sample.shape[0] // 2))  # (side, images): CFG doubles the batch
        if sample.shape[-1] == 9 and sample.shape[0] > 2:  # 72 px: only one image fits
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    text = RECIPE.replace("size: 64x64", "size: [72x72, 64x64]")
    s, counts, events = _render_with_hook(tmp_path, hook, text=text)
    assert counts["done"] == 12 and s.failed == 0
    assert [e["size"] for e in events if e["event"] == "oom"] == ["72x72", "72x72"]
    assert max(n for side, n in seen if side == 64) == 4  # the 64 px batches kept the recipe's batch size
    assert sorted({n for side, n in seen if side == 72}) == [1, 2, 4]


def test_oom_policy_per_size_and_a_single_job_fails_at_once(tmp_path):
    from test_render import RECIPE, write_recipe
    from imagegen.plan import plan
    from imagegen.recipe import load_recipe
    from imagegen.render.batching import GROW_AFTER, Batches

    jobs = plan(load_recipe(write_recipe(tmp_path, text=RECIPE.replace("seeds: [11, 12, 13]", "seeds: [1, 2, 3, 4, 5, 6, 7, 8, 9]"))))
    b = Batches(jobs[:1], 4)
    one = b.next()
    assert len(one) == 1 and b.out_of_memory(one) is False  # nothing smaller to try: no pointless retries
    b = Batches(jobs * 40, 4)
    first = b.next()
    assert b.out_of_memory(first) and b.batch_size == 2
    assert b.out_of_memory(b.next()) and b.batch_size == 1
    for _ in range(GROW_AFTER):
        b.succeeded(b.next())
    assert len(b.next()) == 2  # memory came back: one try at twice the size
    b2 = b.next()
    assert b.out_of_memory(b2) and b.batch_size == 1
    for _ in range(3 * GROW_AFTER):
        b.succeeded(b.next())
    assert len(b.next()) == 1  # that size failed after growing: it holds


def test_failed_batches_in_a_row_stop_the_render_with_jobs_pending(tmp_path):
    from imagegen.render.batching import MAX_FAILED_BATCHES, RenderStopped

    calls = []

    def hook(module, args):
        calls.append(1)
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx`")

    err, counts, events = _render_with_hook(tmp_path, hook, batch_size=1)
    assert isinstance(err, RenderStopped) and err.exit_code == 1
    assert f"{MAX_FAILED_BATCHES} batches in a row failed" in err.message and "resume" in err.message
    assert "\n" not in err.message
    assert len(calls) == MAX_FAILED_BATCHES  # not one attempt per job
    assert counts["pending"] == 6 and counts["failed"] == 0  # the next run takes them up again
    finish = [e for e in events if e["event"] == "finish"][-1]
    assert finish["left"] == 6 and finish["interrupted"] == "repeated failures"


def test_a_good_batch_releases_held_failures_as_ordinary_ones(tmp_path):
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) <= 2:  # two batches fail at their first step, then all goes well
            raise RuntimeError("boom")

    s, counts, _ = _render_with_hook(tmp_path, hook, batch_size=1)
    assert (s.rendered, s.failed) == (4, 2) and counts["failed"] == 2


def test_sticky_cuda_error_stops_at_once(tmp_path):
    from imagegen.render.batching import RenderStopped

    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) > 3:  # the first batch (3 steps) renders
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    err, counts, _ = _render_with_hook(tmp_path, hook, batch_size=2)
    assert isinstance(err, RenderStopped) and "illegal memory access" in err.message
    assert len(calls) == 4 and counts["done"] == 2 and counts["pending"] == 4 and counts["failed"] == 0


def test_oom_while_fusing_loras_fails_that_batch_not_the_run(tmp_path):
    from engine_fixtures import make_tiny_lora

    make_tiny_lora(tmp_path / "style.safetensors", "sd15", seed=3)

    def patch(eng):
        original = eng.pipeline.fuse_lora
        state = {"n": 0}

        def fuse(*a, **k):
            state["n"] += 1
            if state["n"] == 1:
                raise torch.OutOfMemoryError("CUDA out of memory while fusing")
            return original(*a, **k)

        eng.pipeline.fuse_lora = fuse

    s, counts, events = _render_with_hook(tmp_path, lambda m, a: None, patch=patch,
                                          extra="loras:\n  - {path: style.safetensors, weight: 0.8}\n")
    assert (s.rendered, s.failed) == (2, 4)
    assert all("applying LoRAs: out of memory" in e["error"] for e in events if e["event"] == "failed")


def test_device_index_beyond_the_machine_is_an_input_error(monkeypatch, capsys):
    from imagegen.cli import run_app
    from imagegen.devices import resolve_device
    from imagegen.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
    assert run_app(["render", "no-such-recipe.yaml", "--device", "cuda:7"]) == 2
    assert "cuda:7" in capsys.readouterr().err
