"""Engine tests on the tiny built-in models: real diffusers pipelines, no mocks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from engine_fixtures import make_realistic_lora, make_tiny_lora, tiny_folder
from imagegen.engine import BUILTIN_MODELS, EngineOOM, GenRequest, GenResult, open_engine
from imagegen.errors import ImagegenError, InputError, ModelError
from imagegen.samplers import sampler_names

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(params=["sd15", "sdxl"])
def engine(request, sd15, sdxl):
    eng = {"sd15": sd15, "sdxl": sdxl}[request.param]
    yield eng
    eng.set_loras([])


def req(seed=1, prompt="a photo of a cat", negative="", size=(64, 64), steps=6, guidance=6.0,
        scheduler="Euler a", clip_skip=None) -> GenRequest:  # fmt: skip
    return GenRequest(prompt, negative, seed, size[0], size[1], steps, guidance, scheduler, clip_skip)


def px(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def maxdiff(a, b) -> int:
    return int(np.abs(px(a) - px(b)).max())


def test_import_is_torch_free():
    code = "import sys, imagegen.engine; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_builtin_names():
    assert BUILTIN_MODELS == ("tiny-sd15", "tiny-sdxl", "demo-sd15", "sd15-arch", "sdxl-arch")
    with pytest.raises(ModelError, match="builtin:tiny-sd15"):
        open_engine("builtin:nope", device="cpu")


def test_tiny_cache_is_built_atomically():
    root = tiny_folder("sd15").parent
    assert (root / "tiny-sd15-v1" / "model_index.json").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary build folders left behind"


def test_generate_tiny(engine):
    assert engine.device == "cpu" and engine.dtype == "fp32"
    assert engine.model_name == f"builtin:tiny-{engine.family}"
    out = engine.generate([req(seed=1, size=(64, 96)), req(seed=2, size=(64, 96))])
    assert [type(r) for r in out] == [GenResult, GenResult]
    for r in out:
        assert r.error is None and r.image.mode == "RGB" and r.image.size == (64, 96)
        assert px(r.image).std() > 5  # not a flat image
    assert maxdiff(out[0].image, out[1].image) > 20  # seeds matter


def test_batch_size_invariance(engine):
    jobs = [req(seed=s, prompt=p, negative=n) for s, p, n in
            [(10, "a cat", ""), (11, "a dog", "blurry"), (12, "a cat", ""), (13, "a red house", "ugly"),
             (14, "a dog", "blurry"), (15, "x", ""), (16, "a cat", "ugly"), (17, "tree", "")]]  # fmt: skip
    batch = engine.generate(jobs)
    for i in (0, 3, 7):
        alone = engine.generate([jobs[i]])[0]
        assert maxdiff(batch[i].image, alone.image) <= 1
    # position does not matter either
    rev = engine.generate(jobs[::-1])
    assert maxdiff(rev[-1].image, batch[0].image) <= 1


@pytest.mark.parametrize(
    "family,scheduler,negative,clip_skip",
    [("sd15", "DPM++ 2M Karras", "blurry, ugly", None), ("sd15", "Euler a", "", None),
     ("sdxl", "Euler a", "", None), ("sdxl", "DPM++ SDE Karras", "bad hands", None), ("sdxl", "Euler", "", 2)],
)  # fmt: skip
def test_equals_plain_diffusers_call(family, scheduler, negative, clip_skip, sd15, sdxl):
    import diffusers

    from imagegen.samplers import lookup_sampler, scheduler_config

    eng = {"sd15": sd15, "sdxl": sdxl}[family]
    r = req(seed=1234, prompt="an astronaut riding a horse", negative=negative, size=(64, 80),
            scheduler=scheduler, clip_skip=clip_skip)  # fmt: skip
    other = req(seed=99, prompt="other", size=(64, 80), scheduler=scheduler, clip_skip=clip_skip)
    ours = eng.generate([r, other])[0].image

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(str(tiny_folder(family)))
    pipe.set_progress_bar_config(disable=True)
    spec = lookup_sampler(scheduler)
    pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(scheduler_config(spec, pipe.scheduler.config),
                                                                          **spec.options)
    if hasattr(pipe.scheduler, "noise_sampler_seed"):  # SDE: the Brownian tree is seeded with the image seed
        pipe.scheduler.noise_sampler_seed = [1234]
    from imagegen.engine.engine import text_model_alias  # diffusers 0.42 + transformers 5.x clip_skip fix

    with text_model_alias(pipe.text_encoder):
        plain = pipe(
            "an astronaut riding a horse",
            negative_prompt=negative or None,
            width=64,
            height=80,
            num_inference_steps=r.steps,
            guidance_scale=r.guidance,
            clip_skip=None if clip_skip is None else clip_skip - 1,
            generator=torch.Generator("cpu").manual_seed(1234),
        ).images[0]
    assert maxdiff(ours, plain) <= 1


def test_clip_skip_changes_image(sd15):
    a = sd15.generate([req(clip_skip=1)])[0].image
    b = sd15.generate([req(clip_skip=None)])[0].image
    c = sd15.generate([req(clip_skip=2)])[0].image
    assert maxdiff(a, b) == 0  # A1111 clip skip 1 is the default
    assert maxdiff(a, c) > 0


def test_guidance_one_skips_negative(sd15):
    a = sd15.generate([req(guidance=1.0, negative="")])[0].image
    b = sd15.generate([req(guidance=1.0, negative="anything")])[0].image
    assert maxdiff(a, b) == 0


def test_every_scheduler_name_builds(sd15):
    import importlib.util

    from imagegen.samplers import lookup_sampler

    has_scipy = importlib.util.find_spec("scipy") is not None
    for name in sampler_names():
        if lookup_sampler(name).diffusers_class == "LMSDiscreteScheduler" and not has_scipy:
            with pytest.raises(InputError, match="scipy"):
                sd15.scheduler_config(name)
            continue
        cfg = sd15.scheduler_config(name)
        assert cfg["num_train_timesteps"] == 1000
    assert sd15.scheduler_config("DPM++ 2M Karras")["use_karras_sigmas"] is True
    assert sd15.scheduler_config("DPM++ 2M SDE")["algorithm_type"] == "sde-dpmsolver++"
    with pytest.raises(InputError, match="DPM\\+\\+ 2M Karras"):
        sd15.scheduler_config("Eulr")
    with pytest.raises(InputError, match="unknown `scheduler`"):
        sd15.generate([req(scheduler="nope")])


@pytest.mark.parametrize("scheduler", ["DPM++ 2M SDE Karras", "DDIM", "UniPC", "Heun", "DPM2 a", "PLMS"])
def test_schedulers_render(sd15, scheduler):
    out = sd15.generate([req(scheduler=scheduler, steps=4)])
    assert out[0].error is None and px(out[0].image).std() > 5


def test_batch_must_share_settings(sd15):
    with pytest.raises(InputError, match="`steps`"):
        sd15.generate([req(steps=4), req(steps=5)])
    with pytest.raises(InputError, match="multiples of 8"):
        sd15.generate([req(size=(60, 64))])
    with pytest.raises(InputError, match="empty"):
        sd15.generate([])


def test_nan_output_is_a_job_error_not_an_exception(sd15):
    """Poison one image of the batch inside the real VAE decoder; the others still come back."""

    def poison(module, args, output):
        output = output.clone()
        output[1] = float("nan")
        return output

    handle = sd15.pipeline.vae.decoder.register_forward_hook(poison)
    try:
        out = sd15.generate([req(seed=1), req(seed=2), req(seed=3)])
    finally:
        handle.remove()
    assert out[1].image is None and "NaN" in out[1].error
    assert out[0].error is None and out[2].error is None
    assert maxdiff(out[0].image, sd15.generate([req(seed=1)])[0].image) <= 1


def test_out_of_memory_becomes_engine_oom(sd15):
    def oom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = sd15.pipeline.unet.register_forward_pre_hook(oom)
    try:
        with pytest.raises(EngineOOM, match="out of memory") as info:
            sd15.generate([req(), req(seed=2)])
    finally:
        handle.remove()
    assert isinstance(info.value, ImagegenError)
    assert sd15.generate([req()])[0].error is None


def test_sdxl_fp16_vae_upcast_survives_oom():
    """fp16 SDXL decodes in fp32 (stock VAE config: force_upcast); an OOM inside that decode
    leaves the VAE back in fp16 so the next, smaller batch works."""
    eng = open_engine("builtin:tiny-sdxl", device="cpu", dtype="fp16")
    assert eng.dtype == "fp16" and eng.pipeline.vae.config.force_upcast
    first = eng.generate([req()])[0]
    assert first.error is None and eng.pipeline.vae.dtype == torch.float16

    def oom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    handle = eng.pipeline.vae.decoder.register_forward_pre_hook(oom)
    try:
        with pytest.raises(EngineOOM):
            eng.generate([req()])
    finally:
        handle.remove()
    assert eng.pipeline.vae.dtype == torch.float16
    assert maxdiff(eng.generate([req()])[0].image, first.image) == 0


# --- LoRAs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lora_weight_zero_equals_none_and_nonzero_changes(engine, tmp_path, fmt):
    lora = make_tiny_lora(tmp_path / f"style.v1.{fmt}.safetensors", engine.family, fmt=fmt, seed=3)
    r = req(seed=7)
    base = engine.generate([r])[0].image
    engine.set_loras([(str(lora), 0.0)])
    assert maxdiff(engine.generate([r])[0].image, base) == 0
    engine.set_loras([(str(lora), 0.8)])
    assert engine.loras == ((str(lora), 0.8),)
    # every LoRA layer in the file found its module, in the UNet and in each text encoder
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        n_file = sum(k.endswith(("lora_down.weight", "lora_A.weight")) for k in f.keys())
    comps = ["unet", "text_encoder"] + (["text_encoder_2"] if engine.family == "sdxl" else [])
    n_model = sum(
        isinstance(m, BaseTunerLayer) for c in comps for m in getattr(engine.pipeline, c).modules()
    )
    assert n_model == n_file and set(engine.pipeline.get_list_adapters()) == set(comps)
    changed = engine.generate([r])[0].image
    assert maxdiff(changed, base) > 10
    engine.set_loras([(str(lora), 0.8)])  # same set: no-op
    assert maxdiff(engine.generate([r])[0].image, changed) == 0
    engine.set_loras([])
    # unfused, unloaded and restored bit for bit: no drift, no leftover adapters
    assert maxdiff(engine.generate([r])[0].image, base) == 0
    assert not any(engine.pipeline.get_list_adapters().values())


def test_lora_stack_weights(sd15, tmp_path):
    # realistic LoRAs: the <= 1 comparisons below cross code paths (stacks fuse differently)
    a = make_realistic_lora(tmp_path / "a.safetensors", "sd15", seed=1)
    b = make_realistic_lora(tmp_path / "b.safetensors", "sd15", seed=2, fmt="diffusers")
    r = req(seed=5)
    try:
        sd15.set_loras([(str(a), 0.6)])
        only_a = sd15.generate([r])[0].image
        sd15.set_loras([(str(a), 0.6), (str(b), 0.0)])
        assert maxdiff(sd15.generate([r])[0].image, only_a) <= 1
        assert len(sd15.pipeline.get_active_adapters()) == 2
        sd15.set_loras([(str(a), 0.6), (str(b), 0.7)])
        assert maxdiff(sd15.generate([r])[0].image, only_a) > 5
        sd15.set_loras([(str(b), 0.7)])
        assert sd15.pipeline.get_active_adapters() == ["lora0_b"]
    finally:
        sd15.set_loras([])


def test_text_encoder_only_lora_changes_image(sd15, tmp_path):
    from safetensors.torch import load_file, save_file

    full = make_tiny_lora(tmp_path / "full.safetensors", "sd15", seed=4)
    te_only = tmp_path / "te.safetensors"
    save_file({k: v for k, v in load_file(str(full)).items() if k.startswith("lora_te_")}, str(te_only))
    base = sd15.generate([req()])[0].image
    try:
        sd15.set_loras([(str(te_only), 1.0)])
        assert maxdiff(sd15.generate([req()])[0].image, base) > 5
    finally:
        sd15.set_loras([])


def test_lora_family_mismatch(sd15, sdxl, tmp_path):
    from imagegen.engine import check_lora

    for fam, other in (("sd15", sdxl), ("sdxl", sd15)):
        for fmt in ("kohya", "diffusers"):
            lora = make_tiny_lora(tmp_path / f"{fam}-{fmt}.safetensors", fam, fmt=fmt)
            check_lora(lora, fam)
            with pytest.raises(ModelError, match=f"{fam}-{fmt}.safetensors.*is for {fam}.*model is {other.family}"):
                check_lora(lora, other.family)
            with pytest.raises(ModelError, match=f"{fam}-{fmt}.safetensors"):
                other.set_loras([(str(lora), 1.0)])
            assert other.loras == ()


def test_lora_missing_or_not_a_lora(sd15, tmp_path):
    from imagegen.engine import check_lora

    with pytest.raises(ModelError, match="missing.safetensors: file not found"):
        sd15.set_loras([(str(tmp_path / "missing.safetensors"), 1.0)])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match="junk.safetensors.*not a readable"):
        check_lora(junk, "sd15")
    with pytest.raises(ModelError, match="only `.safetensors`"):
        check_lora(tmp_path / "x.pt", "sd15")


def test_lora_that_does_not_fit_the_model(sd15, tmp_path):
    from safetensors.torch import save_file

    def kohya(path, module, n_in, n_out=32):
        k = "lora_unet_" + module
        tensors = {k + ".lora_down.weight": torch.randn(4, n_in), k + ".lora_up.weight": torch.randn(n_out, 4),
                   k + ".alpha": torch.tensor(4.0)}  # fmt: skip
        save_file(tensors, str(path))
        return str(path)

    base = sd15.generate([req()])[0].image
    missing = kohya(tmp_path / "nomatch.safetensors", "down_blocks_0_attentions_7_transformer_blocks_0_attn1_to_q", 32)
    with pytest.raises(ModelError, match="nomatch.safetensors: cannot apply to builtin:tiny-sd15: .*not found"):
        sd15.set_loras([(missing, 1.0)])
    bad = kohya(tmp_path / "badshape.safetensors", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 40)
    with pytest.raises(ModelError, match="badshape.safetensors: cannot apply.*size mismatch"):
        sd15.set_loras([(bad, 1.0)])
    assert sd15.loras == () and not any(sd15.pipeline.get_list_adapters().values())
    assert maxdiff(sd15.generate([req()])[0].image, base) == 0


SAMPLER_TABLE = [
    # name, class, karras, algorithm_type (DPM++ multistep), first timestep
    ("Euler", "EulerDiscreteScheduler", False, None, 999),
    ("Euler a", "EulerAncestralDiscreteScheduler", None, None, 999),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", False, "dpmsolver++", 999),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", True, "dpmsolver++", 999),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", False, "sde-dpmsolver++", 999),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", True, "sde-dpmsolver++", 999),
    ("DPM++ SDE", "DPMSolverSDEScheduler", False, None, 999),
    ("DPM++ SDE Karras", "DPMSolverSDEScheduler", True, None, 999),
    ("LMS", "LMSDiscreteScheduler", False, None, 999),
    ("UniPC", "UniPCMultistepScheduler", False, None, 999),
    ("DDIM", "DDIMScheduler", None, None, 951),  # A1111's DDIM: "leading" spacing, steps_offset 1
]


@pytest.mark.parametrize("name,cls,karras,algo,first_t", SAMPLER_TABLE)
@pytest.mark.parametrize("model_config", ["shipped", "customised"])
def test_sampler_names_fix_the_sampler_whatever_the_model_config(name, cls, karras, algo, first_t, model_config):
    """A folder shipped with a Karras/SDE scheduler config must not change what a name means."""
    import json

    import diffusers

    from imagegen.engine.builtin import CONFIG_DIR
    from imagegen.samplers import lookup_sampler, scheduler_config

    base = json.loads((CONFIG_DIR / "sdxl" / "scheduler" / "scheduler_config.json").read_text())
    if model_config == "customised":
        base.update(use_karras_sigmas=not bool(karras), algorithm_type="sde-dpmsolver++", timestep_spacing="trailing")
        if name == "DDIM":
            base["timestep_spacing"] = "leading"
    spec = lookup_sampler(name)
    sched = getattr(diffusers, spec.diffusers_class).from_config(scheduler_config(spec, base), **spec.options)
    assert type(sched).__name__ == cls
    if karras is not None:
        assert sched.config.use_karras_sigmas is karras
    if algo is not None:
        assert sched.config.algorithm_type == algo
    sched.set_timesteps(20)
    assert round(float(sched.timesteps[0])) == first_t


def test_sde_sampler_is_seeded_per_image(sd15):
    """DPM++ SDE draws Brownian noise: the same seed gives the same image, alone or in a batch."""
    jobs = [req(seed=s, scheduler="DPM++ SDE Karras", steps=4) for s in (5, 6, 7)]
    batch = sd15.generate(jobs)
    again = sd15.generate([jobs[1]])[0]
    assert maxdiff(batch[1].image, again.image) <= 1
    assert maxdiff(batch[0].image, batch[1].image) > 0


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_clip_skip_applies_to_the_negative_prompt_too(family, sd15, sdxl):
    """A1111 skips CLIP layers for the negative prompt as well; diffusers alone does not."""
    eng = {"sd15": sd15, "sdxl": sdxl}[family]
    eng._prompt_cache.clear()
    plain_pos, plain_neg = eng._encode("a horse", "ugly", True, None)[:2]
    skip_pos, skip_neg = eng._encode("a horse", "ugly", True, 1)[:2]
    assert not torch.equal(plain_pos, skip_pos) and not torch.equal(plain_neg, skip_neg)
    alone = eng._encode("ugly", "", False, 1)[0]  # the negative, encoded as a prompt with clip skip
    assert torch.equal(skip_neg, alone)
