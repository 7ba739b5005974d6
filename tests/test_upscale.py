"""Upscaler: detection of both official weight layouts, tiling quality, sizes, formats, metadata.

Every model here is a tiny network with seeded random weights, saved in the key layouts that
the official Real-ESRGAN / ESRGAN files use (the old-ESRGAN renaming is written out here,
independently of the library's own mapping). No downloads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from imagegen.errors import InputError, ModelError
from imagegen.upscale import load_upscaler, plan_passes, read_metadata, upscale_image
from imagegen.upscale.archs.compact.net import SRVGGNetCompact
from imagegen.upscale.archs.rrdbnet.net import RRDBNet
from imagegen.upscale.resize import resize_strips
from imagegen.upscale.tiling import TileConfig, Tiler, choose_config, layout
from imagegen.upscale.writers import write_png, write_tiff

# ---------------------------------------------------------------------------------------------
# Tiny models in the official layouts


def _init(net: torch.nn.Module, seed: int, gain: float = 0.5) -> torch.nn.Module:
    """Seeded random weights scaled so the output is smooth-ish and mostly inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if p.ndim == 4:
            fan_in = p.shape[1] * 9
            p.data = torch.randn(p.shape, generator=g) * (gain * (2 / fan_in) ** 0.5)
        elif name.endswith("bias"):
            p.data = (torch.rand(p.shape, generator=g) - 0.5) * 0.1
        else:  # PReLU slopes
            p.data = torch.rand(p.shape, generator=g) * 0.3
    if isinstance(net, RRDBNet):
        net.conv_last.bias.data[:] = 0.5
    return net.eval()


def rrdb(*, nf: int = 8, nb: int = 1, gc: int = 4, unshuffle: int = 1, seed: int = 0, gain: float = 0.5) -> RRDBNet:
    return _init(RRDBNet(num_feat=nf, num_block=nb, num_grow=gc, unshuffle=unshuffle), seed, gain)


def compact(*, nf: int = 8, nconv: int = 2, scale: int = 4, seed: int = 0) -> SRVGGNetCompact:
    return _init(SRVGGNetCompact(num_feat=nf, num_conv=nconv, scale=scale), seed)


def esrgan_old_keys(sd: dict[str, torch.Tensor], nb: int) -> dict[str, torch.Tensor]:
    """BasicSR RRDBNet names -> the original ESRGAN `model.N` names (2 upsample stages)."""
    trunk = {"conv_first": "model.0", "conv_body": f"model.1.sub.{nb}", "conv_up1": "model.3",
             "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)", k)
        if m:
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = v
        else:
            mod, kind = k.rsplit(".", 1)
            out[f"{trunk[mod]}.{kind}"] = v
    return out


def save(net: torch.nn.Module, path: Path, layout: str) -> Path:
    sd = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    if layout == "esrgan":
        sd = esrgan_old_keys(sd, len(net.body))
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    elif layout == "esrgan":
        torch.save(sd, path)
    else:
        torch.save({"params_ema" if isinstance(net, RRDBNet) else "params": sd}, path)
    return path


def smooth_image(w: int, h: int, *, alpha: bool = False, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [128 + 90 * np.sin(xx / rng.uniform(5, 11) + c) * np.cos(yy / rng.uniform(5, 11)) for c in range(3)]
    if alpha:
        chans.append(255 * (xx + yy) / (w + h))
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def run(up, img: np.ndarray, tile: int | None) -> np.ndarray:
    h, w = img.shape[:2]
    return np.concatenate(list(Tiler(up).strips(img, choose_config(up, w, h, tile))))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def reference(net: torch.nn.Module, img: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = net(x).clamp(0, 1)[0]
    return (y * 255).round().byte().permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# 1. Detection of every variant in both layouts

VARIANTS = [
    # (id, builder, layout, suffix, expected arch, scale, details)
    ("x4plus-basicsr", lambda: rrdb(nb=2), "basicsr", ".pth", "RRDBNet", 4, {"num_block": 2, "num_feat": 8, "num_grow": 4}),
    ("x4plus-esrgan", lambda: rrdb(nb=2), "esrgan", ".pth", "RRDBNet", 4, {"num_block": 2, "unshuffle": 1}),
    ("x4plus-safetensors", lambda: rrdb(nb=2), "basicsr", ".safetensors", "RRDBNet", 4, {"num_block": 2}),
    ("x2plus-basicsr", lambda: rrdb(unshuffle=2), "basicsr", ".pth", "RRDBNet", 2, {"unshuffle": 2}),
    ("x2plus-esrgan", lambda: rrdb(unshuffle=2), "esrgan", ".pth", "RRDBNet", 2, {"unshuffle": 2}),
    ("x1-basicsr", lambda: rrdb(unshuffle=4), "basicsr", ".pth", "RRDBNet", 1, {"unshuffle": 4}),
    ("anime6B-basicsr", lambda: rrdb(nb=6, nf=4, gc=2), "basicsr", ".pth", "RRDBNet", 4, {"num_block": 6, "num_feat": 4, "num_grow": 2}),
    ("anime6B-esrgan", lambda: rrdb(nb=6, nf=4, gc=2), "esrgan", ".safetensors", "RRDBNet", 4, {"num_block": 6}),
    ("general-x4v3", lambda: compact(nf=8, nconv=4), "compact", ".pth", "SRVGGNetCompact", 4, {"num_conv": 4, "num_feat": 8}),
    ("animevideov3", lambda: compact(nf=6, nconv=2), "compact", ".safetensors", "SRVGGNetCompact", 4, {"num_conv": 2, "num_feat": 6}),
    ("compact-x2", lambda: compact(nconv=1, scale=2), "compact", ".pth", "SRVGGNetCompact", 2, {"num_conv": 1}),
]


@pytest.mark.parametrize("vid,build,layout,suffix,arch,scale,details", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_detects_layout_and_reproduces_the_network(tmp_path, vid, build, layout, suffix, arch, scale, details):
    net = build()
    path = save(net, tmp_path / f"{vid}{suffix}", layout)
    up = load_upscaler(path, device="cpu")
    assert (up.arch, up.scale, up.name) == (arch, scale, vid)
    for key, value in details.items():
        assert getattr(up.spec, key) == value, key
    assert re.fullmatch(r"[0-9a-f]{64}", up.sha256) and up.short_hash == up.sha256[:10]
    # The weights went to the right places: the loaded module holds exactly the tensors we saved
    # (same names after the layout mapping, bit-identical values).
    loaded = up.module.state_dict()
    want = net.state_dict()
    assert loaded.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(loaded[key].cpu(), value), key
    img = smooth_image(24, 20)
    out = run(up, img, tile=0)
    assert out.shape == (20 * scale, 24 * scale, 3)
    # And the loaded upscaler runs that network: its float output equals the saved network's
    # within float rounding. Two call paths may pick different kernels, so 8-bit values can flip
    # at .5 boundaries (FACTS.md); compare floats. Measured rounding here: <= 5e-7; the least
    # visible wrong mapping we tried (two residual-dense convs of one block swapped) moves the
    # output by 1.4e-4, so 1e-5 passes rounding and fails each wrong mapping we tried (the state-dict
    # check above is the exact one).
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        want_float = net(x).clamp(0, 1)
    got_float = up(x)
    assert got_float.shape == want_float.shape
    assert float((got_float - want_float).abs().max()) < 1e-5
    # The 8-bit image from the tiler is that float output rounded: at most one level off where
    # a value sits on a rounding boundary.
    assert int(np.abs(out.astype(int) - reference(net, img).astype(int)).max()) <= 1


def test_old_esrgan_layout_equals_basicsr_layout(tmp_path):
    net = rrdb(nb=2, seed=3)
    a = load_upscaler(save(net, tmp_path / "a.pth", "basicsr"), device="cpu")
    b = load_upscaler(save(net, tmp_path / "b.pth", "esrgan"), device="cpu")
    assert (a.spec.layout, b.spec.layout) == ("basicsr", "esrgan")
    img = smooth_image(20, 16)
    np.testing.assert_array_equal(run(a, img, 0), run(b, img, 0))


class NotATensor:
    """A pickled object that `torch.load(weights_only=True)` refuses."""


def test_bad_weight_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(ModelError, match="junk.pth: cannot read weight file: it is neither a PyTorch checkpoint") as exc:
        load_upscaler(junk, device="cpu")
    assert "expected Real-ESRGAN weights" in str(exc.value)

    torch.save({"params_ema": NotATensor()}, tmp_path / "objects.pth")
    with pytest.raises(ModelError, match="objects.pth: refused: this pickle holds Python objects") as exc:
        load_upscaler(tmp_path / "objects.pth", device="cpu")
    assert "weights_only" not in str(exc.value)  # never advise loading an unknown pickle unsafely
    (tmp_path / "cut.pth").write_bytes((tmp_path / "objects.pth").read_bytes()[:64])
    with pytest.raises(ModelError, match="cut.pth: cannot read weight file: a damaged or unsupported zip checkpoint"):
        load_upscaler(tmp_path / "cut.pth", device="cpu")
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, other)
    with pytest.raises(ModelError, match="understood layouts: BasicSR RRDBNet"):
        load_upscaler(other, device="cpu")
    # Right keys, wrong shapes: strict loading names the architecture it tried.
    sd = rrdb().state_dict()
    sd["conv_hr.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save({"params_ema": sd}, tmp_path / "shapes.pth")
    with pytest.raises(ModelError, match="do not fit RRDBNet x4"):
        load_upscaler(tmp_path / "shapes.pth", device="cpu")
    with pytest.raises(InputError, match="not found"):
        load_upscaler(tmp_path / "missing.pth")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="must be a .pth"):
        load_upscaler(tmp_path / "w.bin")
    with pytest.raises(InputError, match="`dtype`"):
        load_upscaler(save(compact(), tmp_path / "c.pth", "compact"), device="cpu", dtype="fp8")


# ---------------------------------------------------------------------------------------------
# 2. Tiling


@pytest.mark.parametrize("kind", ["rrdb-x4", "rrdb-x2-odd", "compact-x4"])
def test_tiled_matches_whole_image(tmp_path, kind):
    if kind == "rrdb-x4":
        net, layout, size = rrdb(nb=1, seed=1), "basicsr", (90, 70)
    elif kind == "rrdb-x2-odd":
        net, layout, size = rrdb(unshuffle=2, seed=2), "esrgan", (91, 67)
    else:
        net, layout, size = compact(nconv=3, seed=4), "compact", (90, 70)
    up = load_upscaler(save(net, tmp_path / "m.pth", layout), device="cpu")
    img = smooth_image(*size, seed=5)
    whole = run(up, img, tile=0)
    tiled = run(up, img, tile=32)
    assert whole.shape == tiled.shape == (size[1] * up.scale, size[0] * up.scale, 3)
    assert psnr(whole, tiled) >= 40


def _seam_ratio(img: np.ndarray, borders: list[int], axis: int, period: int) -> float:
    """Mean |difference| between neighbouring columns (axis=1) or rows (axis=0) at `borders`,
    divided by the same mean over every other neighbour pair of the same phase modulo `period`
    (the x4 nets upsample by nearest neighbour, so the statistics repeat every `period` pixels)."""
    d = np.abs(np.diff(img.astype(np.float64), axis=axis)).mean(axis=(1 - axis, 2))
    idx = np.arange(d.size)
    border = np.zeros(d.shape, bool)
    border[borders] = True
    phases = {b % period for b in borders}
    same_phase = np.isin(idx % period, list(phases)) & ~border
    return float(d[border].mean() / d[same_phase].mean())


def test_no_seams_at_tile_borders(tmp_path):
    # A livelier net (about 1 grey level between neighbours on average, nothing clipped) on a
    # smooth image with mild noise, so neighbour differences are real numbers, not all zero.
    net = rrdb(nb=1, seed=7, gain=1.0)
    net.conv_last.weight.data *= 3
    up = load_upscaler(save(net, tmp_path / "m.pth", "basicsr"), device="cpu")
    rng = np.random.default_rng(0)
    img = np.clip(smooth_image(120, 100, seed=8) + rng.normal(0, 12, (100, 120, 3)), 0, 255).astype(np.uint8)
    s = up.scale
    cfg = TileConfig(tile=32, overlap=8, margin=2, batch=1)
    tiled = np.concatenate(list(Tiler(up).strips(img, cfg)))
    whole = run(up, img, tile=0)
    assert np.abs(np.diff(tiled.astype(float), axis=1)).mean() > 0.5
    (tx, xs), (ty, ys) = layout(120, 32, 8), layout(100, 32, 8)
    # Every output column/row where some tile begins or ends (a hard paste would jump there).
    bx = sorted({x * s - 1 for x in xs[1:]} | {(x + tx) * s - 1 for x in xs[:-1]})
    by = sorted({y * s - 1 for y in ys[1:]} | {(y + ty) * s - 1 for y in ys[:-1]})
    rx, ry = _seam_ratio(tiled, bx, 1, s), _seam_ratio(tiled, by, 0, s)
    assert rx <= 1.05 and ry <= 1.05, (rx, ry)
    # ... and the same as the untiled output shows at those very places.
    assert abs(rx - _seam_ratio(whole, bx, 1, s)) < 0.02 and abs(ry - _seam_ratio(whole, by, 0, s)) < 0.02

    # Control: the same tiles pasted hard (each tile owns up to the middle of the overlap) do
    # show seams, so the measure above can see them.
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
    pasted = np.zeros_like(tiled)
    for y0 in ys:
        for x0 in xs:
            out = up(x[None, :, y0 : y0 + ty, x0 : x0 + tx])[0]
            out = (out * 255).round().byte().permute(1, 2, 0).numpy()
            pasted[y0 * s : (y0 + ty) * s, x0 * s : (x0 + tx) * s] = out
    cuts_x = [x * s - 1 for x in xs[1:]]
    cuts_y = [y * s - 1 for y in ys[1:]]
    assert _seam_ratio(pasted, cuts_x, 1, s) > 1.5
    assert _seam_ratio(pasted, cuts_y, 0, s) > 1.5
    assert _seam_ratio(tiled, cuts_x, 1, s) <= 1.05


class _SmallMemoryUpscaler:
    """Wraps a real upscaler and raises torch's out-of-memory error for tiles over 16 px."""

    def __init__(self, up):
        self.inner = up
        self.calls: list[tuple[int, ...]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch):
        self.calls.append(tuple(batch.shape))
        if batch.shape[0] > 1 or batch.shape[-1] > 16:
            raise torch.OutOfMemoryError("test: pretend the tile does not fit")
        return self.inner(batch)


def test_out_of_memory_backoff_halves_tiles(tmp_path):
    up = load_upscaler(save(compact(nconv=2, seed=9), tmp_path / "m.pth", "compact"), device="cpu")
    img = smooth_image(60, 50, seed=10)
    small = _SmallMemoryUpscaler(up)
    cfg = TileConfig(tile=32, overlap=8, margin=2, batch=2)
    out = np.concatenate(list(Tiler(small).strips(img, cfg)))
    assert any(c[0] == 2 for c in small.calls) and any(c[0] == 1 and c[-1] <= 16 for c in small.calls)
    assert psnr(out, run(up, img, 0)) >= 40


# ---------------------------------------------------------------------------------------------
# 3. Plans, resizing


def test_plan_passes():
    p = plan_passes(1536, 1024, 4, target_width=17000)
    assert p.final_size == (17000, 11333) and p.passes == 2
    assert [s.kind for s in p.steps] == ["model", "resize", "model", "resize"]
    assert p.steps[1].out_size == (4250, 2834)  # shrink so the last pass lands just above target
    assert len(p.describe().splitlines()) == 4
    assert plan_passes(100, 50, 4, scale=4).describe() == "model x4: 100x50 -> 400x200"
    p = plan_passes(100, 50, 4, target_height=60)
    assert [s.kind for s in p.steps] == ["model", "resize"] and p.final_size == (120, 60)
    p = plan_passes(100, 100, 4, scale=14)  # 1600 after two passes: small overshoot, no shrink
    assert [s.kind for s in p.steps] == ["model", "model", "resize"]
    assert plan_passes(10, 10, 1, scale=2).passes == 1
    with pytest.raises(InputError, match="exactly one of"):
        plan_passes(10, 10, 4, scale=2, target_width=40)
    with pytest.raises(InputError, match="`scale` must be"):
        plan_passes(10, 10, 4, scale=0.5)
    with pytest.raises(InputError, match="`target_width`"):
        plan_passes(100, 10, 4, target_width=50)
    # the one size limit, with its reason, agrees with the README (BigTIFF could hold more)
    with pytest.raises(InputError, match="at most 65000 px per side in every format") as exc:
        plan_passes(1536, 1024, 4, target_width=70000)
    assert "BigTIFF itself could hold more" in str(exc.value)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "at most 65000 px\n  per side in every format" in readme


def _lanczos(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.LANCZOS))


def test_streaming_lanczos_matches_one_shot():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (301, 97, 3), dtype=np.uint8)
    smooth = smooth_image(97, 301, seed=3)
    for size in [(80, 211), (97, 299), (150, 700), (40, 301)]:
        for src in (noise, smooth):
            pieces = [src[i : i + 37] for i in range(0, 301, 37)]
            got = np.concatenate(list(resize_strips(pieces, (97, 301), size)))
            # Same as one horizontal then one vertical pass over the whole image, whatever the strips.
            two_pass = _lanczos(_lanczos(src, (size[0], 301)), size)
            assert got.shape == two_pass.shape
            assert np.abs(got.astype(int) - two_pass).max() <= 1
        # And within rounding of Pillow's one-shot resize on a natural-looking image.
        assert np.abs(got.astype(int) - _lanczos(smooth, size)).max() <= 2


# ---------------------------------------------------------------------------------------------
# 4. Files: formats, alpha, metadata, atomicity

PARAMS = "a lighthouse, golden hour — ünïcode\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 7"


def _source(tmp_path: Path, *, alpha: bool = False, size=(45, 31)) -> Path:
    img = smooth_image(*size, alpha=alpha, seed=11)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", PARAMS)
    info.add_text("imagegen", json.dumps({"job": {"id": "abc123", "index": 42}, "recipe": "demo"}))
    path = tmp_path / "src.png"
    Image.fromarray(img).save(path, pnginfo=info)
    return path


@pytest.fixture(scope="module")
def tiny_x4(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    return load_upscaler(save(compact(nconv=1, seed=12), d / "tiny-x4.pth", "compact"), device="cpu")


@pytest.mark.parametrize("fmt", ["tif", "png", "jpg"])
def test_metadata_carried_over(tmp_path, tiny_x4, fmt):
    src = _source(tmp_path)
    plan = plan_passes(45, 31, 4, target_width=250)
    out = upscale_image(src, tmp_path / f"out.{fmt}", tiny_x4, plan, fmt=fmt, tile=16)
    meta = read_metadata(out)
    assert meta["parameters"].startswith(PARAMS + ", Upscaler: tiny-x4, Upscaler hash: " + tiny_x4.short_hash)
    assert "Upscale passes: 2 (" in meta["parameters"] and meta["parameters"].endswith("Final size: 250x172")
    data = meta["imagegen"]
    assert data["job"] == {"id": "abc123", "index": 42} and data["recipe"] == "demo"
    assert data["upscale"]["model_sha256"] == tiny_x4.sha256
    assert data["upscale"]["final_size"] == [250, 172] and data["upscale"]["source"]["file"] == "src.png"
    with Image.open(out) as im:
        assert im.size == (250, 172)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tiff_is_tiled_compressed_bigtiff(tmp_path, tiny_x4):
    import tifffile

    src = _source(tmp_path, size=(80, 70))
    out = upscale_image(src, tmp_path / "o.tif", tiny_x4, plan_passes(80, 70, 4, scale=4), tile=32)
    with tifffile.TiffFile(out) as tf:
        page = tf.pages[0]
        assert tf.is_bigtiff and page.is_tiled and page.compression == 8 and page.shape == (280, 320, 3)
        assert "Upscaler: tiny-x4" in page.description
        pixels = page.asarray()
    rgb = np.asarray(Image.open(src).convert("RGB"))
    np.testing.assert_array_equal(pixels, run(tiny_x4, rgb, 32))


def test_png_writer_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (37, 300, 4), dtype=np.uint8)
    img[:, :150] //= 3  # some structure for the filter
    with open(tmp_path / "a.png", "wb") as f:
        write_png(f, [img[i : i + 10] for i in range(0, 37, 10)], 300, 37, 4, "p ü", {"k": "✓"})
    with Image.open(tmp_path / "a.png") as im:
        np.testing.assert_array_equal(np.asarray(im), img)
        assert im.info["parameters"] == "p ü"
    with open(tmp_path / "a.tif", "wb") as f:
        write_tiff(f, [img[i : i + 7, :, :3] for i in range(0, 37, 7)], 300, 37, 3, None, None)
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), img[..., :3])


def test_rgba_colour_by_model_alpha_by_resize(tmp_path, tiny_x4):
    src = _source(tmp_path, alpha=True, size=(40, 30))
    plan = plan_passes(40, 30, 4, target_width=130)
    out = upscale_image(src, tmp_path / "o.png", tiny_x4, plan, tile=16, fmt="png")
    rgba = np.asarray(Image.open(out))
    assert rgba.shape == (98, 130, 4)
    source = Image.open(src)
    want_alpha = _lanczos(np.asarray(source.getchannel("A")), (130, 98))
    assert np.abs(rgba[..., 3].astype(int) - want_alpha).max() <= 2
    rgb_only = tmp_path / "rgb.png"
    source.convert("RGB").save(rgb_only)
    colour = np.asarray(Image.open(upscale_image(rgb_only, tmp_path / "c.png", tiny_x4, plan, tile=16, fmt="png")))
    np.testing.assert_array_equal(rgba[..., :3], colour)
    with pytest.raises(InputError, match="alpha"):
        upscale_image(src, tmp_path / "o.jpg", tiny_x4, plan, fmt="jpg")
    assert not (tmp_path / "o.jpg").exists()


def test_x2_model_on_odd_sizes(tmp_path):
    up = load_upscaler(save(rrdb(unshuffle=2, seed=13), tmp_path / "x2.pth", "basicsr"), device="cpu")
    src = _source(tmp_path, size=(33, 27))
    out = upscale_image(src, tmp_path / "o.png", up, plan_passes(33, 27, 2, scale=2), fmt="png", tile=16)
    with Image.open(out) as im:
        assert im.size == (66, 54)
    # The padded pixels are cropped: the output equals the whole-image run of the padded input.
    rgb = np.asarray(Image.open(src).convert("RGB"))
    padded = np.pad(rgb, ((0, 1), (0, 1), (0, 0)), mode="reflect")
    assert psnr(np.asarray(Image.open(out)), reference(up.module, padded)[:54, :66]) >= 40


def test_upscale_image_input_errors(tmp_path, tiny_x4):
    src = _source(tmp_path)
    plan = plan_passes(45, 31, 4, scale=2)
    with pytest.raises(InputError, match="`format`"):
        upscale_image(src, tmp_path / "o.webp", tiny_x4, plan, fmt="webp")
    with pytest.raises(InputError, match="suffix"):
        upscale_image(src, tmp_path / "o.png", tiny_x4, plan, fmt="tif")
    with pytest.raises(InputError, match="plan made for 10x10"):
        upscale_image(src, tmp_path / "o.tif", tiny_x4, plan_passes(10, 10, 4, scale=2))
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="cannot read image"):
        upscale_image(tmp_path / "bad.png", tmp_path / "o.tif", tiny_x4, plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "src.png"]


def test_package_import_is_torch_free():
    code = "import sys, imagegen.upscale, imagegen.cli.upscale; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_images_over_pillows_pixel_limit_are_read(tmp_path, tiny_x4, monkeypatch):
    # Pillow refuses images over 2x MAX_IMAGE_PIXELS (~179 MP by default); lower the limit so a
    # small image stands in for a huge one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    src = _source(tmp_path, size=(45, 31))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(src)
    out = upscale_image(src, tmp_path / "o.jpg", tiny_x4, plan_passes(45, 31, 4, scale=2), fmt="jpg", tile=16)
    assert read_metadata(out)["parameters"].endswith("Final size: 90x62")
    assert Image.MAX_IMAGE_PIXELS == 500  # restored after use


def test_upscale_note_parses_as_a1111_fields(tmp_path, tiny_x4):
    metadata = pytest.importorskip("imagegen.metadata")
    src = _source(tmp_path)
    out = upscale_image(src, tmp_path / "o.png", tiny_x4, plan_passes(45, 31, 4, target_width=250), fmt="png")
    fields = metadata.parse_parameters(read_metadata(out)["parameters"])
    assert fields["prompt"] == "a lighthouse, golden hour — ünïcode" and fields["negative"] == "blurry"
    assert fields["Seed"] == "7" and fields["Upscaler"] == "tiny-x4"
    assert fields["Upscaler hash"] == tiny_x4.short_hash and fields["Final size"] == "250x172"
    assert fields["Upscale passes"].startswith("2 (x4 180x124; lanczos 63x43; x4 252x172")


class _FailingUpscaler:
    """A real upscaler that breaks down after `ok` forward calls (a crash mid-image)."""

    def __init__(self, up, ok: int):
        self.inner, self.ok = up, ok

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch):
        if self.ok == 0:
            raise RuntimeError("test: crash in the middle of the image")
        self.ok -= 1
        return self.inner(batch)


@pytest.mark.parametrize("fmt", ["tif", "png"])
def test_crash_mid_write_leaves_nothing(tmp_path, tiny_x4, fmt):
    src = _source(tmp_path, size=(90, 80))
    plan = plan_passes(90, 80, 4, scale=4)
    with pytest.raises(RuntimeError, match="crash in the middle"):
        upscale_image(src, tmp_path / f"o.{fmt}", _FailingUpscaler(tiny_x4, ok=5), plan, fmt=fmt, tile=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.png"]


def test_16_bit_grey_input_is_rounded_to_8_bits(tmp_path):
    import numpy as np
    from PIL import Image

    from imagegen.upscale.pipeline import read_image

    wide = (np.arange(64, dtype=np.uint16) * 1021).reshape(8, 8)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    rgb, alpha, _ = read_image(tmp_path / "g16.png")
    assert alpha is None and rgb.shape == (8, 8, 3)
    assert np.array_equal(rgb[..., 0], np.round(wide / 257).astype(np.uint8))
