"""Loading models: single files in the A1111 layout, diffusers folders, VAEs, family detection
and its refusals, missing files, and no network."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest

from engine_fixtures import (
    fake_checkpoint_shapes,
    make_single_file,
    make_tiny_lora,
    open_clip_to_ldm,
    tiny_folder,
    unet_to_ldm,
    vae_to_ldm,
    write_fake_safetensors,
)
from imagegen.engine import GenRequest, detect_family, open_engine
from imagegen.errors import InputError, ModelError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    return {fam: make_single_file(d / f"tiny-{fam}.safetensors", fam) for fam in ("sd15", "sdxl")}


JOBS = [
    GenRequest("a lighthouse at dusk", "fog", 42, 64, 80, 5, 6.5, "DPM++ 2M Karras"),
    GenRequest("a lighthouse at dusk", "", 43, 64, 80, 5, 6.5, "DPM++ 2M Karras"),
]


def render(engine, jobs=JOBS) -> list[np.ndarray]:
    out = engine.generate(jobs)
    assert all(r.error is None for r in out)
    return [np.asarray(r.image).astype(np.int16) for r in out]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_renders_same_pixels_as_folder(family, single_files):
    folder = tiny_folder(family)
    assert detect_family(single_files[family]) == family
    from_folder = open_engine(str(folder), device="cpu")
    from_file = open_engine(str(single_files[family]), device="cpu", _config_dir=folder)
    assert from_file.family == family and from_file.model_name == f"tiny-{family}"
    for a, b in zip(render(from_folder), render(from_file)):
        assert np.abs(a - b).max() <= 1
    # every weight arrived: the text encoders are not left at random init
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ma, mb = getattr(from_folder.pipeline, comp, None), getattr(from_file.pipeline, comp, None)
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_without_text_model_level_loads(family, single_files, tmp_path):
    """transformers 5 saves CLIP without `text_model.`; single files converted from such a folder
    keep that layout (A1111 loads them; diffusers' own loader does not)."""
    from imagegen.modelfiles import bare_clip_prefix, read_safetensors_shapes

    folder = tiny_folder(family)
    bare = make_single_file(tmp_path / f"bare-{family}.safetensors", family, text_model_level=False)
    shapes = read_safetensors_shapes(bare)
    assert not any(".text_model." in k for k in shapes) and bare_clip_prefix(shapes)
    assert bare_clip_prefix(read_safetensors_shapes(single_files[family])) is None
    assert detect_family(bare) == family
    eng = open_engine(str(bare), device="cpu", _config_dir=folder)
    ref = open_engine(str(folder), device="cpu")
    sa, sb = ref.pipeline.text_encoder.state_dict(), eng.pipeline.text_encoder.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for a, b in zip(render(ref, JOBS[:1]), render(eng, JOBS[:1])):
        assert np.abs(a - b).max() <= 1


def test_lora_on_single_file_model(single_files, tmp_path):
    folder = tiny_folder("sdxl")
    eng = open_engine(str(single_files["sdxl"]), device="cpu", _config_dir=folder)
    lora = make_tiny_lora(tmp_path / "xl.safetensors", "sdxl", seed=9)
    base = render(eng)[0]
    eng.set_loras([(str(lora), 1.0)])
    assert np.abs(render(eng)[0] - base).max() > 10
    eng.set_loras([])
    assert np.abs(render(eng)[0] - base).max() == 0


@pytest.mark.parametrize("fmt", ["single-file", "folder"])
def test_separate_vae(fmt, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tiny_folder("sd15")
    vae_sd = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    base = open_engine(str(folder), device="cpu")
    same = render(base)
    # the model's own VAE, given separately: same pixels
    if fmt == "single-file":
        vae_path = tmp_path / "vae.safetensors"
        save_file({k: v.contiguous() for k, v in vae_to_ldm(vae_sd, vae_cfg, prefix="").items()}, str(vae_path))
    else:
        vae_path = tmp_path / "vae-folder"
        shutil.copytree(folder / "vae", vae_path)
    eng = open_engine(str(folder), vae=str(vae_path), device="cpu", _config_dir=folder)
    for a, b in zip(same, render(eng)):
        assert np.abs(a - b).max() <= 1
    # a different VAE: different pixels
    changed = dict(vae_sd)
    changed["decoder.conv_out.bias"] = changed["decoder.conv_out.bias"] + 0.3
    if fmt == "single-file":
        save_file({k: v.contiguous() for k, v in vae_to_ldm(changed, vae_cfg, prefix="").items()}, str(vae_path))
    else:
        save_file(changed, str(vae_path / "diffusion_pytorch_model.safetensors"))
    eng = open_engine(str(folder), vae=str(vae_path), device="cpu", _config_dir=folder)
    assert np.abs(same[0] - render(eng)[0]).max() > 10


def test_missing_vae():
    with pytest.raises(ModelError, match="VAE .*nope.safetensors: file not found"):
        open_engine("builtin:tiny-sd15", vae="/nope/nope.safetensors", device="cpu")


# --- the shipped full-size configs agree with the A1111 layout and diffusers' detection ------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_shipped_configs_match_a1111_layout(family):
    """Build the full-size architecture on the meta device from the shipped configs, write its
    keys the A1111 way, and check that diffusers' own converter and model-type detection, and
    ours, read them back."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from engine_fixtures import clip_to_ldm
    from imagegen.engine.builtin import CONFIG_DIR
    from imagegen.modelfiles import classify_checkpoint_keys

    cfg = CONFIG_DIR / family
    unet_cfg = UNet2DConditionModel.load_config(str(cfg), subfolder="unet")
    vae_cfg = AutoencoderKL.load_config(str(cfg), subfolder="vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        te_cfg = CLIPTextConfig.from_pretrained(str(cfg), subfolder="text_encoder")
        te = CLIPTextModelWithProjection(te_cfg)  # same text_model keys as CLIPTextModel
        te_sd = {k: v for k, v in te.state_dict().items() if not k.startswith("text_projection")}
        ldm = unet_to_ldm(unet.state_dict(), unet_cfg)
        ldm.update(vae_to_ldm(vae.state_dict(), vae_cfg))
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(cfg), subfolder="text_encoder_2"))
            ldm.update(clip_to_ldm(te_sd, "conditioner.embedders.0.transformer."))
            ldm.update(open_clip_to_ldm(te2.state_dict()))
        else:
            ldm.update(clip_to_ldm(te_sd, "cond_stage_model.transformer."))
    n_unet = sum(p.numel() for p in unet.parameters())
    assert n_unet == {"sd15": 859_520_964, "sdxl": 2_567_463_684}[family]
    assert sfu.infer_diffusers_model_type(ldm) == {"sd15": "v1", "sdxl": "xl_base"}[family]
    back = sfu.convert_ldm_unet_checkpoint(ldm, unet_cfg)
    assert back.keys() == unet.state_dict().keys()
    assert sfu.convert_ldm_vae_checkpoint(ldm, vae_cfg).keys() == vae.state_dict().keys()
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert classify_checkpoint_keys(shapes)[0] == family


# --- detection and refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,message",
    [("sd2", "Stable Diffusion 2"), ("inpaint", "inpainting model .*9 input channels"),
     ("refiner", "SDXL refiner"), ("sd3", "Stable Diffusion 3"), ("flux", "Flux"),
     ("unknown", "no `model.diffusion_model.` UNet keys")],
)  # fmt: skip
def test_detect_rejects(kind, message, tmp_path):
    path = write_fake_safetensors(tmp_path / f"{kind}.safetensors", fake_checkpoint_shapes(kind))
    with pytest.raises(ModelError, match=f"{kind}.safetensors: unsupported model: detected .*{message}"):
        detect_family(path)
    if kind == "inpaint":  # loads for img2img / inpainting requests (test_photo_engine.py); this one has no weights
        return
    with pytest.raises(ModelError, match=message):
        open_engine(str(path), device="cpu")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_detect_accepts(kind, tmp_path):
    path = write_fake_safetensors(tmp_path / f"{kind}.safetensors", fake_checkpoint_shapes(kind))
    assert detect_family(path) == kind


def test_detect_builtin():
    assert detect_family("builtin:tiny-sdxl") == "sdxl"
    assert detect_family("builtin:sd15-arch") == "sd15"
    with pytest.raises(ModelError, match="unknown builtin model 'builtin:x'"):
        detect_family("builtin:x")


def test_detect_folders(tmp_path):
    assert detect_family(tiny_folder("sd15")) == "sd15"
    assert detect_family(tiny_folder("sdxl")) == "sdxl"

    def fake_folder(name, index, unet=None):
        d = tmp_path / name
        (d / "unet").mkdir(parents=True)
        (d / "model_index.json").write_text(json.dumps(index))
        (d / "unet" / "config.json").write_text(json.dumps(unet or {}))
        return d

    sd2 = fake_folder("sd2", {"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 1024})
    with pytest.raises(ModelError, match="Stable Diffusion 2"):
        detect_family(sd2)
    inpaint = fake_folder("inp", {"_class_name": "StableDiffusionPipeline"}, {"in_channels": 9})
    with pytest.raises(ModelError, match="9 input channels"):
        detect_family(inpaint)
    refiner = fake_folder("ref", {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]})
    with pytest.raises(ModelError, match="StableDiffusionXLImg2ImgPipeline"):
        detect_family(refiner)
    flux = fake_folder("flux", {"_class_name": "FluxPipeline"})
    with pytest.raises(ModelError, match="`FluxPipeline` pipeline"):
        detect_family(flux)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no `model_index.json`"):
        detect_family(tmp_path / "empty")


def test_detect_other_files(tmp_path):
    lora = make_tiny_lora(tmp_path / "a-lora.safetensors", "sd15")
    with pytest.raises(ModelError, match="a LoRA, not a checkpoint"):
        detect_family(lora)
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"\x80\x02")
    with pytest.raises(ModelError, match="old.ckpt: unsupported checkpoint format `.ckpt`"):
        detect_family(ckpt)
    with pytest.raises(ModelError, match="file not found"):
        detect_family(tmp_path / "gone.safetensors")


def test_open_engine_errors(tmp_path):
    with pytest.raises(ModelError, match="nope/model.safetensors: file not found"):
        open_engine("/nope/model.safetensors", device="cpu")
    with pytest.raises(ModelError, match="hub ids need `--allow-download`"):
        open_engine("someone/some-model", device="cpu")
    with pytest.raises(ModelError, match="`family` is 'sdxl' but the model is sd15"):
        open_engine(str(tiny_folder("sd15")), family="sdxl", device="cpu")
    with pytest.raises(InputError, match="`dtype` 'fp8'"):
        open_engine("builtin:tiny-sd15", dtype="fp8", device="cpu")
    with pytest.raises(InputError, match="`device` 'warp9'"):
        open_engine("builtin:tiny-sd15", device="warp9")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            open_engine("builtin:tiny-sd15", device="cuda")


def test_no_network(monkeypatch, tmp_path, single_files):
    """With every socket connection refused: build a builtin from scratch, load a single file
    and a folder, render."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    folder = tiny_folder("sdxl")  # built before the env change below
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "fresh-cache"))
    for eng in (
        open_engine("builtin:tiny-sd15", device="cpu"),  # builds into the empty cache
        open_engine(str(single_files["sdxl"]), device="cpu", _config_dir=folder),
        open_engine(str(folder), device="cpu"),
    ):
        assert render(eng, JOBS[:1])[0].std() > 5
    assert (tmp_path / "fresh-cache" / "builtin" / "tiny-sd15-v1" / "model_index.json").is_file()
    assert attempts == []
