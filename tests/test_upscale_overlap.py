"""Upscaler stages side by side: the overlapped path writes the sequential path's bytes; even
tile layouts; parallel resize and PNG deflate are exact; producer threads stop and report."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from imagegen.errors import ModelError
from imagegen.upscale import load_upscaler, plan_passes, upscale_image
from imagegen.upscale import writers
from imagegen.upscale.resize import resize_strips
from imagegen.upscale.stages import Timed, pipelined, prefetch
from imagegen.upscale.tiling import layout
from imagegen.upscale.writers import _paeth, adler32_combine, write_png
from test_upscale import _source, compact, save, smooth_image


@pytest.fixture(scope="module")
def tiny_x4(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    return load_upscaler(save(compact(nconv=1, seed=21), d / "tiny-x4.pth", "compact"), device="cpu")


# ---------------------------------------------------------------------------------------------
# 1. The overlapped path writes the sequential path's bytes


@pytest.mark.parametrize("fmt,alpha", [("tif", False), ("png", False), ("png", True), ("tif", True), ("jpg", False)])
def test_overlapped_output_equals_sequential_bytes(tmp_path, tiny_x4, monkeypatch, fmt, alpha):
    monkeypatch.setattr(writers, "PNG_SEGMENT_BYTES", 6000)  # many PNG segments
    src = _source(tmp_path, alpha=alpha, size=(41, 29))
    plan = plan_passes(41, 29, 4, target_width=470)  # two model passes, a shrink between, a final resize
    assert [s.kind for s in plan.steps] == ["model", "resize", "model", "resize"]
    seq_t: dict[str, float] = {}
    ovl_t: dict[str, float] = {}
    ticks: list[tuple[int, int, bool]] = []
    main = threading.current_thread()
    seq = upscale_image(src, tmp_path / f"seq.{fmt}", tiny_x4, plan, tile=16, fmt=fmt, overlap=False, timings=seq_t)
    ovl = upscale_image(src, tmp_path / f"ovl.{fmt}", tiny_x4, plan, tile=16, fmt=fmt, timings=ovl_t,
                        progress=lambda d, t: ticks.append((d, t, threading.current_thread() is main)))
    assert seq.read_bytes() == ovl.read_bytes()
    with Image.open(ovl) as im:
        assert im.size == plan.final_size
    # Progress is shown in the caller's thread only, up to the total, never backwards.
    assert ticks[-1][0] == ticks[-1][1] and all(m for _, _, m in ticks)
    assert [d for d, _, _ in ticks] == sorted(d for d, _, _ in ticks)
    # Stage times: sequential stages add up to the wall time (less the metadata work).
    stages = ["read", "model", "resize", "encode"] + (["alpha"] if alpha else [])
    for t in (seq_t, ovl_t):
        assert set(stages) | {"total"} == set(t) and all(t[k] >= 0 for k in t)
    assert sum(seq_t[k] for k in stages) <= seq_t["total"] * 1.001 + 1e-3


def test_overlapped_single_pass_no_resize_equals_sequential(tmp_path, tiny_x4):
    src = _source(tmp_path, size=(50, 34))
    plan = plan_passes(50, 34, 4, scale=4)
    assert [s.kind for s in plan.steps] == ["model"]
    a = upscale_image(src, tmp_path / "a.png", tiny_x4, plan, tile=16, fmt="png", overlap=False)
    b = upscale_image(src, tmp_path / "b.png", tiny_x4, plan, tile=16, fmt="png")
    assert a.read_bytes() == b.read_bytes()


class _FailingUpscaler:
    """A real upscaler that raises ModelError on its `n`-th tile batch."""

    def __init__(self, up, n):
        self.inner, self.n, self.calls = up, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.n:
            raise ModelError("test: the model failed mid-image")
        return self.inner(batch)


@pytest.mark.parametrize("fmt", ["tif", "png"])
def test_model_error_in_producer_thread_is_raised_and_nothing_is_left(tmp_path, tiny_x4, fmt):
    src = _source(tmp_path, size=(41, 29))
    plan = plan_passes(41, 29, 4, target_width=470)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ModelError, match="mid-image"):
        upscale_image(src, tmp_path / f"o.{fmt}", _FailingUpscaler(tiny_x4, 20), plan, tile=16, fmt=fmt)
    assert not (tmp_path / f"o.{fmt}").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert {t.name for t in threading.enumerate()} - before == set()


# ---------------------------------------------------------------------------------------------
# 2. Even tiles


@pytest.mark.parametrize("n,tile,overlap,multiple", [
    (120, 32, 8, 1), (100, 32, 8, 1), (4250, 320, 32, 1), (2834, 320, 32, 1), (1536, 1024, 32, 1),
    (6144, 1024, 32, 1), (90, 32, 8, 2), (92, 32, 8, 4), (17, 16, 4, 1), (33, 32, 8, 1), (32, 32, 8, 1),
])
def test_layout_splits_each_side_evenly(n, tile, overlap, multiple):
    t, xs = layout(n, tile, overlap, multiple)
    assert t <= tile and xs[0] == 0 and xs[-1] + t == n
    gaps = [b - a for a, b in zip(xs, xs[1:])]
    assert all(t - g >= overlap for g in gaps)  # neighbours overlap by at least `overlap`
    assert not gaps or max(gaps) - min(gaps) <= multiple  # spread evenly
    assert all(x % multiple == 0 for x in xs)
    if len(xs) > 1:  # the fewest tiles: one fewer of the largest size could not cover n
        k = len(xs) - 1
        assert k * tile - (k - 1) * overlap < n
    assert layout(n, tile, overlap, multiple) == (t, xs)  # a function of its arguments only


# ---------------------------------------------------------------------------------------------
# 3. Parallel resize and PNG deflate are exact


def test_parallel_resize_strips_equal_sequential():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (301, 97, 3), dtype=np.uint8)
    pieces = lambda: (img[i : i + 23] for i in range(0, 301, 23))  # noqa: E731
    for size in [(250, 700), (60, 150), (97, 301)]:
        one = np.concatenate(list(resize_strips(pieces(), (97, 301), size)))
        many = np.concatenate(list(resize_strips(pieces(), (97, 301), size, workers=3)))
        np.testing.assert_array_equal(one, many)


def _idat(data: bytes) -> bytes:
    out, pos = b"", 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            out += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    return out


@pytest.mark.parametrize("segment", [300, 7000, 1 << 22])
@pytest.mark.parametrize("w,h,c", [(37, 29, 3), (300, 41, 4), (5, 1, 3), (9000, 5, 3)])
def test_png_segments_are_one_valid_zlib_stream(monkeypatch, segment, w, h, c):
    monkeypatch.setattr(writers, "PNG_SEGMENT_BYTES", segment)
    rng = np.random.default_rng(w + h)
    img = smooth_image(w, h, alpha=c == 4, seed=4)
    img[:, : w // 3] = rng.integers(0, 256, (h, w // 3, c), dtype=np.uint8)  # some noise too
    files = []
    for workers in (0, 1, 3):
        f = io.BytesIO()
        write_png(f, [img[i : i + 11] for i in range(0, h, 11)], w, h, c, "p", {"k": 1}, workers=workers)
        files.append(f.getvalue())
    assert files[0] == files[1] == files[2]
    with Image.open(io.BytesIO(files[0])) as im:
        np.testing.assert_array_equal(np.asarray(im), img)  # decodes bit-exactly
    # zlib itself (which checks the Adler-32) gives back exactly the Paeth-filtered rows.
    flat = img.reshape(h, w * c)
    assert zlib.decompress(_idat(files[0])) == _paeth(flat, np.zeros(w * c, np.uint8), c).tobytes()


def test_adler32_combine():
    rng = np.random.default_rng(5)
    for n1, n2 in [(0, 5), (5, 0), (1000, 777), (70000, 123456)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert adler32_combine(zlib.adler32(a), zlib.adler32(b), n2) == zlib.adler32(a + b)


# ---------------------------------------------------------------------------------------------
# 4. Stage plumbing


def test_prefetch_order_errors_and_early_stop():
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("boom")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = prefetch(endless(), depth=2, name="endless")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops: the thread stops and closes its source
    assert closed.is_set()
    assert not any(t.name == "imagegen-upscale-endless" for t in threading.enumerate())


def test_pipelined_keeps_order_and_timed_counts():
    assert list(pipelined(range(20), lambda x: x * x, workers=3, depth=4)) == [x * x for x in range(20)]
    assert list(pipelined(range(5), str, workers=0, depth=0)) == ["0", "1", "2", "3", "4"]
    t = Timed(iter([1, 2]))
    assert list(t) == [1, 2] and t.seconds >= 0
