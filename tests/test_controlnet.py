"""ControlNet building blocks: loading from one file in both key layouts, control images, the
ControlNet pipelines over an engine's components, and canny edges. Tiny random ControlNets made
from the tiny built-in UNets (tests/controlnet_fixtures.py); real diffusers pipelines, no mocks.

"Exactly" below means bit-equal float arrays, and holds where the two results come from the same
code path: the same weights through the same model class, or the same ControlNet pipeline where
the only difference is a residual multiplied by 0 (x + 0.0 * r == x in IEEE floats)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnet_fixtures import make_tiny_controlnet, save_controlnet, tiny_unet
from engine_fixtures import make_tiny_lora, write_fake_safetensors
from imagegen.canny import canny, canny_edges, gray
from imagegen.engine import open_engine
from imagegen.engine.controlnet import (ControlUnit, clear_cache, controlnet_pipeline, load_controlnet,
                                        prepare_control_image, read_controlnet_layout)
from imagegen.errors import InputError, ModelError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, STEPS, PROMPT = 64, 4, "a bottle on a table"
LAYOUTS = [("diffusers", ""), ("ldm", "control_model."), ("ldm", "")]


@pytest.fixture(scope="module")
def nets():
    return {f: make_tiny_controlnet(f) for f in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def files(nets, tmp_path_factory):
    d = tmp_path_factory.mktemp("controlnets")
    return {(f, layout, prefix): save_controlnet(nets[f], d / f"{f}-{layout}-{prefix or 'bare'}.safetensors", layout, prefix)
            for f in nets for layout, prefix in LAYOUTS}  # fmt: skip


@pytest.fixture(scope="module")
def engines():
    return {f: open_engine(f"builtin:tiny-{f}", device="cpu") for f in ("sd15", "sdxl")}


def control_image(size: int = SIZE) -> Image.Image:
    im = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(im).rectangle([size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1], outline="white", width=2)
    return im


def cn_forward(net, family: str):
    """The ControlNet's residuals on fixed random inputs."""
    g = torch.Generator().manual_seed(1)
    cross = net.config.cross_attention_dim
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 48, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        down, mid = net(torch.randn(1, 4, 8, 8, generator=g), 10, torch.randn(1, 7, cross, generator=g),
                        torch.rand(1, 3, 64, 64, generator=g), return_dict=False, **kwargs)
    return [d.numpy() for d in down] + [mid.numpy()]


# -- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout,prefix", LAYOUTS)
def test_loads_each_layout_with_the_in_memory_outputs(nets, files, family, layout, prefix):
    path = files[(family, layout, prefix)]
    assert read_controlnet_layout(path) == (layout, prefix)
    loaded = load_controlnet(path, family, device="cpu", unet=tiny_unet(family))
    assert loaded.config.block_out_channels == nets[family].config.block_out_channels
    for a, b in zip(cn_forward(nets[family], family), cn_forward(loaded, family), strict=True):
        np.testing.assert_array_equal(a, b)  # same weights, same class: exactly


def test_sd15_loads_without_the_unet_hint(nets, files):
    """The tiny SD1.5 ControlNet needs no hint: SD1.5's rule (8 heads) is what it was made with."""
    loaded = load_controlnet(files[("sd15", "ldm", "control_model.")], "sd15", device="cpu")
    for a, b in zip(cn_forward(nets["sd15"], "sd15"), cn_forward(loaded, "sd15"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_dtype_and_cache(files, tmp_path):
    clear_cache()
    src = files[("sd15", "diffusers", "")]
    path = tmp_path / "cn.safetensors"
    path.write_bytes(src.read_bytes())
    a = load_controlnet(path, "sd15", device="cpu", dtype="fp32")
    assert load_controlnet(path, "sd15", device="cpu", dtype=torch.float32) is a  # cached
    assert load_controlnet(path, "sd15", device="cpu", dtype="bf16").dtype == torch.bfloat16
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten file is loaded again
    assert load_controlnet(path, "sd15", device="cpu", dtype="fp32") is not a


def _one_line_error(path, family, **kw) -> str:
    with pytest.raises(ModelError) as e:
        load_controlnet(path, family, device="cpu", **kw)
    msg = e.value.message
    assert "\n" not in msg and str(path) in msg and e.value.exit_code == 2
    return msg


@pytest.mark.parametrize("layout,prefix", LAYOUTS)
def test_family_mismatch_is_an_input_error(files, layout, prefix):
    assert "SDXL ControlNet, but the model is SD1.5" in _one_line_error(files[("sdxl", layout, prefix)], "sd15")
    assert "SD1.5 ControlNet, but the model is SDXL" in _one_line_error(files[("sd15", layout, prefix)], "sdxl")


def test_a_controlnet_that_does_not_fit_the_unet(files):
    unet = dict(tiny_unet("sd15").config)
    msg = _one_line_error(files[("sd15", "diffusers", "")], "sd15", unet={**unet, "cross_attention_dim": 768})
    assert "`cross_attention_dim` 32 does not fit" in msg


def test_files_that_are_not_controlnets(tmp_path):
    from engine_fixtures import make_single_file

    ckpt = make_single_file(tmp_path / "model.safetensors", "sd15")
    assert "not a ControlNet model" in _one_line_error(ckpt, "sd15") and "checkpoint" in _one_line_error(ckpt, "sd15")
    lora = make_tiny_lora(tmp_path / "style.safetensors", "sd15")
    assert "looks like a LoRA" in _one_line_error(lora, "sd15")
    other = write_fake_safetensors(tmp_path / "x.safetensors", {"foo.weight": (3, 3)})
    assert "not a ControlNet model" in _one_line_error(other, "sd15")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    assert "not a readable .safetensors" in _one_line_error(junk, "sd15")
    assert "file not found" in _one_line_error(tmp_path / "missing.safetensors", "sd15")
    assert "only `.safetensors`" in _one_line_error(ckpt.rename(tmp_path / "model.ckpt"), "sd15")


def test_truncated_key_set_is_an_input_error(files, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(files[("sd15", "diffusers", "")]))
    del sd["down_blocks.0.resnets.0.conv1.weight"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    assert "ControlNet layout" in _one_line_error(tmp_path / "broken.safetensors", "sd15")
    whole = files[("sd15", "ldm", "control_model.")].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])  # header intact, tensors cut
    assert "cannot read its tensors" in _one_line_error(tmp_path / "cut.safetensors", "sd15")


# -- control images ---------------------------------------------------------------------------


def test_prepare_control_image_fits_and_crops_centred():
    wide = Image.new("RGB", (200, 100), "black")
    ImageDraw.Draw(wide).rectangle([50, 0, 149, 99], fill="white")  # the middle half is white
    out = prepare_control_image(wide, 64, 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    a = np.asarray(out).astype(int)
    assert a[:, 4:60].min() >= 250  # the centre square of the source, scaled: white (Lanczos rings at the cut)
    tall = prepare_control_image(wide.rotate(90, expand=True), 32, 64)  # 100x200 onto 32x64: same aspect
    assert tall.size == (32, 64)
    np.testing.assert_array_equal(np.asarray(tall), np.asarray(wide.rotate(90, expand=True).resize((32, 64), Image.LANCZOS)))
    same = control_image()
    assert np.array_equal(np.asarray(prepare_control_image(same, SIZE, SIZE)), np.asarray(same))
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert np.asarray(prepare_control_image(rgba, 8, 8)).max() == 0  # transparent counts as black
    with pytest.raises(InputError):
        prepare_control_image(same, 0, 64)


# -- pipelines --------------------------------------------------------------------------------


def run(pipe, kw: dict, family: str, seed: int = 5, steps: int = STEPS, record: list | None = None):
    extra = {}
    if record is not None:
        def cb(p, i, t, tensors):
            record.append(tensors["latents"].clone())
            return tensors
        extra = {"callback_on_step_end": cb, "callback_on_step_end_tensor_inputs": ["latents"]}
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # fresh, one model call per step
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        return pipe(PROMPT, width=SIZE, height=SIZE, num_inference_steps=steps, guidance_scale=5.0, generator=g,
                    output_type="np", **kw, **extra).images[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weight_one_changes_the_image_and_weight_zero_does_not(engines, nets, family):
    engine, net, image = engines[family], nets[family], control_image()
    plain = run(engine.pipeline, {}, family)
    cn0, kw0 = controlnet_pipeline(engine.pipeline, family, [ControlUnit(net, image, weight=0.0)])
    assert type(cn0).__name__ == ("StableDiffusionControlNetPipeline" if family == "sd15" else "StableDiffusionXLControlNetPipeline")
    assert cn0.unet is engine.pipeline.unet and cn0.vae is engine.pipeline.vae  # the same components, no copy
    at0 = run(cn0, kw0, family)
    # Across code paths (plain pipeline vs ControlNet pipeline at weight 0): the same operations
    # plus residuals times 0; stated tolerance 1e-6 (float32), measured exactly 0 here.
    np.testing.assert_allclose(at0, plain, atol=1e-6, rtol=0)
    cn1, kw1 = controlnet_pipeline(engine.pipeline, family, [ControlUnit(net, image, weight=1.0)])
    at1 = run(cn1, kw1, family)
    assert np.isfinite(at1).all()
    assert np.abs(at1 - plain).mean() * 255 > 2  # a visible change, mean over pixels, in 8-bit levels


def test_start_and_end_are_respected(engines, nets):
    engine, net, image = engines["sd15"], nets["sd15"], control_image()

    def latents(**unit):
        pipe, kw = controlnet_pipeline(engine.pipeline, "sd15", [ControlUnit(net, image, **unit)])
        rec: list = []
        run(pipe, kw, "sd15", record=rec)
        return [r.numpy() for r in rec]

    off, full = latents(weight=0.0), latents()
    late = latents(start=0.5)  # steps 0, 1 of 4 without the ControlNet
    early = latents(end=0.5)  # steps 0, 1 with it, 2, 3 without
    for i in (0, 1):
        np.testing.assert_array_equal(late[i], off[i])  # same pipeline, residual x 0: exactly
        np.testing.assert_array_equal(early[i], full[i])
    assert not np.array_equal(late[2], off[2]) and not np.array_equal(early[2], full[2])
    assert not np.array_equal(full[0], off[0])


def test_several_units_make_a_multicontrolnet(engines, nets):
    engine, net, image = engines["sd15"], nets["sd15"], control_image()
    other = make_tiny_controlnet("sd15", seed=7)
    one, kw1 = controlnet_pipeline(engine.pipeline, "sd15", [ControlUnit(net, image, weight=0.8, end=0.75)])
    two, kw2 = controlnet_pipeline(engine.pipeline, "sd15", [ControlUnit(net, image, weight=0.8, end=0.75),
                                                             ControlUnit(other, image.rotate(90), weight=0.0)])
    assert type(two.controlnet).__name__ == "MultiControlNetModel"
    assert kw2["controlnet_conditioning_scale"] == [0.8, 0.0] and kw2["control_guidance_end"] == [0.75, 1.0]
    # r1 * 0.8 + r2 * 0.0 == r1 * 0.8: the same as the single unit, exactly
    np.testing.assert_array_equal(run(two, kw2, "sd15"), run(one, kw1, "sd15"))
    both, kwb = controlnet_pipeline(engine.pipeline, "sd15", [ControlUnit(net, image, weight=0.8, end=0.75),
                                                              ControlUnit(other, image.rotate(90), weight=1.0)])
    assert not np.array_equal(run(both, kwb, "sd15"), run(one, kw1, "sd15"))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_img2img_and_inpaint_variants(engines, nets, family):
    engine, net = engines[family], nets[family]
    init = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype("uint8"))
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, SIZE // 2, SIZE], fill=255)
    for kind, extra in (("img2img", {"image": init, "strength": 0.75}), ("inpaint", {"image": init, "mask_image": mask})):
        pipe, kw = controlnet_pipeline(engine.pipeline, family, [ControlUnit(net, control_image())], kind=kind)
        assert "control_image" in kw and "image" not in kw
        out = run(pipe, {**kw, **extra}, family)
        assert out.shape == (SIZE, SIZE, 3) and np.isfinite(out).all()


def test_bad_units_and_kinds(engines, nets):
    pipe = engines["sd15"].pipeline
    with pytest.raises(InputError, match="at least one unit"):
        controlnet_pipeline(pipe, "sd15", [])
    with pytest.raises(InputError, match="start"):
        controlnet_pipeline(pipe, "sd15", [ControlUnit(nets["sd15"], control_image(), start=0.8, end=0.2)])
    with pytest.raises(InputError, match="kind"):
        controlnet_pipeline(pipe, "sd15", [ControlUnit(nets["sd15"], control_image())], kind="upscale")


# -- canny ------------------------------------------------------------------------------------


def square(size: int = 64, lo: int = 16, hi: int = 47) -> Image.Image:
    im = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(im).rectangle([lo, lo, hi, hi], fill=(200, 180, 160))
    return im


def test_canny_finds_the_edges_of_a_square():
    out = canny(square())
    assert out.mode == "RGB" and out.size == (64, 64)
    a = np.asarray(out)
    assert set(np.unique(a)) == {0, 255} and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    ys, xs = np.nonzero(a[..., 0])
    near = np.minimum.reduce([np.abs(ys - 16), np.abs(ys - 47), np.abs(xs - 16), np.abs(xs - 47)])
    assert near.max() <= 1  # every edge pixel within 1 px of the square's border
    inside = (ys >= 15) & (ys <= 48) & (xs >= 15) & (xs <= 48)
    assert inside.all()
    for side in (16, 47):  # each side is found along its length (corners aside)
        assert len({y for y, x in zip(ys, xs) if abs(x - side) <= 1 and 18 <= y <= 45}) == 28
        assert len({x for y, x in zip(ys, xs) if abs(y - side) <= 1 and 18 <= x <= 45}) == 28
    assert not canny(Image.new("RGB", (32, 32), (90, 90, 90))).getbbox()  # flat: no edge


def noisy_scene(seed: int, w: int = 161, h: int = 121) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), (40, 60, 80))
    d = ImageDraw.Draw(im)
    for _ in range(10):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(5, 40))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    a = np.asarray(im).astype(int) + rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_canny_thresholds_are_monotone_and_deterministic():
    im = noisy_scene(1)
    g = gray(im)
    edges = {(lo, hi): canny_edges(g, lo, hi) for lo in (20, 60, 100) for hi in (100, 150, 250)}
    for (lo, hi), e in edges.items():
        for (lo2, hi2), e2 in edges.items():
            if lo2 >= lo and hi2 >= hi:
                assert not (e2 & ~e).any(), f"edges at {lo2}/{hi2} not a subset of {lo}/{hi}"
    assert edges[(20, 100)].sum() > edges[(100, 250)].sum() > 0
    assert canny(im, 50, 150).tobytes() == canny(im, 50, 150).tobytes()
    assert canny(im, 50, 150, blur=1.5).tobytes() == canny(im, 50, 150, blur=1.5).tobytes()
    assert np.asarray(canny(im, 50, 150, blur=1.5)).sum() < np.asarray(canny(im, 50, 150)).sum()  # blur drops noise edges


def test_canny_bad_thresholds():
    for lo, hi, blur in ((200, 100, 0), (-1, 100, 0), (10, 20, -1)):
        with pytest.raises(InputError):
            canny(square(), lo, hi, blur=blur)


def test_canny_matches_opencv():
    """Where cv2 is installed (the `test` extra): on the same 8-bit grayscale image our edge map
    equals `cv2.Canny`'s exactly (the same integer arithmetic); from RGB, OpenCV's own gray
    conversion may differ from ours by 1 level on some pixels, so the edge maps may differ on
    at most 1% of the edge pixels."""
    cv2 = pytest.importorskip("cv2")
    for seed in range(3):
        im = noisy_scene(seed)
        rgb = np.asarray(im)
        g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        assert np.abs(gray(im).astype(int) - g).max() <= 1
        for lo, hi in ((100, 200), (50, 100), (20, 250), (100.7, 200.2)):
            ref = cv2.Canny(g, lo, hi) > 0
            np.testing.assert_array_equal(canny_edges(g, lo, hi), ref)
            ours = np.asarray(canny(im, lo, hi))[..., 0] > 0
            assert (ours != (cv2.Canny(g, lo, hi) > 0)).sum() <= 0.01 * ref.sum()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_real_size_configs_are_inferred_from_shapes(family):
    """The real SD1.5 / SDXL ControlNet layouts (built on the meta device from the shipped UNet
    configs: no memory, no weights) give back their config from shapes alone, in both layouts,
    without the UNet hint (heads from the shipped config, whose channels they match)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from controlnet_fixtures import controlnet_to_ldm
    from imagegen.engine.builtin import CONFIG_DIR
    from imagegen.engine.controlnet import _fits, _to_diffusers, infer_controlnet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_DIR / family / "unet")))
        want = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    shapes = {k: tuple(v.shape) for k, v in want.state_dict().items()}
    for named in (shapes, _to_diffusers(controlnet_to_ldm(shapes, want.config.layers_per_block), "control_model.")):
        got = infer_controlnet_config(named, family)
        with torch.device("meta"):
            model = ControlNetModel(**got)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
        for key in ("attention_head_dim", "cross_attention_dim", "use_linear_projection", "addition_time_embed_dim",
                    "projection_class_embeddings_input_dim", "conditioning_channels"):
            a, b = want.config[key], got.get(key)
            assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), key
        _fits("x.safetensors", got, family, None)  # the right width for the family
