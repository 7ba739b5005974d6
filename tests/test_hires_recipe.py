"""`hires:` in recipes and plans: validation, sweep axes, job ids, the plan's pixel summary. No torch."""

import textwrap
from pathlib import Path

import pytest

from imagegen.errors import RecipeError
from imagegen.plan import count_jobs, pixel_summary, plan
from imagegen.recipe import hires_size, load_recipe

BASE = """
name: h
model:
  checkpoint: builtin:tiny-sd15
prompt: a cube
seeds: [1, 2]
steps: 4
scheduler: Euler a
"""


def load(tmp_path: Path, hires: str, base: str = BASE):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(base) + textwrap.dedent(hires))
    return load_recipe(path)


def problems(tmp_path: Path, hires: str) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load(tmp_path, hires)
    return exc.value.problems


def test_hires_size_follows_a1111():
    assert hires_size(1024, 1024, ("scale", 1.5)) == (1536, 1536)
    assert hires_size(512, 768, ("scale", 2)) == (1024, 1536)
    assert hires_size(72, 72, ("scale", 1.5)) == (104, 104)  # int(108) rounded down to a multiple of 8
    assert hires_size(1024, 768, ("width", 1536)) == (1536, 1152)
    assert hires_size(768, 1024, ("height", 1536)) == (1152, 1536)


def test_sweeps_defaults_and_ids(tmp_path):
    r = load(tmp_path, """
        hires:
          scale: [1.5, 2]
          denoise: [0.35, 0.6]
    """)
    assert r.hires.upscaler == "latent" and r.hires.steps is None and r.hires.scheduler is None
    jobs = plan(r)
    assert len(jobs) == count_jobs(r) == 2 * 2 * 2
    j = jobs[0]
    assert (j.hires.width, j.hires.height, j.hires.denoise, j.hires.steps, j.hires.scheduler) == (96, 96, 0.35, 4, "Euler a")
    assert dict(j.axes)["hires"] == "x1.5 96x96" and dict(j.axes)["denoise"] == "0.35"
    assert j.content()["hires"] == {"size": [96, 96], "upscaler": "latent", "denoise": 0.35, "steps": 4, "scheduler": "Euler a"}
    assert len({x.id for x in jobs}) == 8
    # the group key separates hires settings: a batch never mixes two second passes
    assert len({x.group_key for x in jobs}) == 4
    # the same resolved size written as width gives the same job ids; keep_first does not change ids
    r2 = load(tmp_path, """
        hires:
          width: 96
          denoise: 0.35
          keep_first: true
    """)
    assert [x.id for x in plan(r2)] == [x.id for x in jobs[:2]]
    assert plan(r2)[0].hires.keep_first and plan(r2)[0].hires.given == ("width", 96)


def test_ids_without_hires_are_unchanged(tmp_path):
    r = load(tmp_path, "")
    assert r.hires is None
    j = plan(r)[0]
    assert "hires" not in j.content() and "hires" not in dict(j.axes)


def test_explicit_steps_and_scheduler_and_pixel_summary(tmp_path):
    r = load(tmp_path, """
        size: 512x512
        hires:
          scale: 2
          steps: 10
          scheduler: DPM++ 2M Karras
          upscaler: lanczos
    """)
    j = plan(r)[0]
    assert (j.hires.steps, j.hires.scheduler, j.hires.upscaler, j.hires.denoise) == (10, "DPM++ 2M Karras", "lanczos", 0.7)
    text = pixel_summary(plan(r))
    assert "512x512 (0.26 MP)" in text and "hires pass at 1024x1024 (1.05 MP)" in text and "1.31 MP per job" in text


def test_validation(tmp_path):
    out = problems(tmp_path, """
        hires:
          scale: 1.5
          width: 1536
    """)
    assert any("give one of `hires.scale`, `hires.width`, `hires.height`" in p for p in out)
    out = problems(tmp_path, """
        hires:
          width: 1004
    """)
    assert any("`hires.width` must be a multiple of 8" in p and "1004" in p for p in out)
    out = problems(tmp_path, """
        hires:
          scale: 0.5
          denoise: [0, 1.5, 0.5, 0.5]
          steps: 0
          keep_first: yes please
          upscaler: bicubic
          scheduler: Euler b
    """)
    text = "\n".join(out)
    assert "`hires.scale` must be a number from 1 to 8, got 0.5" in text
    assert "`hires.denoise` must be a number above 0 and at most 1, got 0" in text and "got 1.5" in text
    assert "`hires.denoise` lists 0.5 twice" in text
    assert "`hires.steps` must be a whole number from 1 to 500" in text
    assert "`hires.keep_first` must be true or false" in text
    assert "`hires.upscaler` must be one of latent, latent-bicubic, latent-nearest, lanczos or a Real-ESRGAN weight file" in text
    assert "unknown `scheduler` \"Euler b\"" in text
    out = problems(tmp_path, """
        size: 4096x4096
        hires:
          scale: 4
    """)
    assert any("makes 4096x4096 into 16384x16384" in p for p in out)
    out = problems(tmp_path, """
        hires:
          scael: 2
    """)
    assert any("unknown key `hires.scael`; did you mean `scale`?" in p for p in out)


def test_upscaler_file_is_checked_without_torch(tmp_path):
    out = problems(tmp_path, """
        hires:
          upscaler: models/missing.pth
    """)
    assert any("hires upscaler file not found" in p for p in out)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    out = problems(tmp_path, """
        hires:
          upscaler: junk.safetensors
    """)
    assert any("`hires.upscaler`:" in p and "not a readable .safetensors file" in p for p in out)


def test_packshot_template_renders_1024_then_1536_and_validates_with_its_files(tmp_path):
    """recipes/sdxl-packshot.yaml with stand-ins for the user's files (a tiny SDXL model, tiny
    LoRAs, a tiny Real-ESRGAN .pth) validates, header-checking the hires upscaler without torch."""
    pytest.importorskip("torch")
    from engine_fixtures import make_tiny_lora
    from test_upscale import rrdb, save

    root = Path(__file__).resolve().parents[1] / "recipes"
    text = (root / "sdxl-packshot.yaml").read_text()
    for sub in ("models", "loras"):
        (tmp_path / sub).mkdir()
    save(rrdb(), tmp_path / "models" / "RealESRGAN_x4plus.pth", "basicsr")
    make_tiny_lora(tmp_path / "loras" / "product-photo.safetensors", "sdxl")
    make_tiny_lora(tmp_path / "loras" / "soft-light.safetensors", "sdxl", seed=1)
    (tmp_path / "wildcards").symlink_to(root / "wildcards")
    text = text.replace("checkpoint: models/sd_xl_base_1.0.safetensors", "checkpoint: builtin:tiny-sdxl")
    (tmp_path / "packshot.yaml").write_text(text)
    r = load_recipe(tmp_path / "packshot.yaml")
    jobs = plan(r)
    assert len(jobs) == 1000 and r.sizes == ((1024, 1024),)
    hr = jobs[0].hires
    assert (hr.width, hr.height, hr.denoise, hr.steps, hr.upscaler) == (1536, 1536, 0.35, 15, str(tmp_path / "models" / "RealESRGAN_x4plus.pth"))
    # a weight file of another kind is refused at validation, naming the layouts we read
    save(rrdb(), tmp_path / "models" / "RealESRGAN_x4plus.pth", "basicsr")
    import torch

    torch.save({"params_ema": {"conv.weight": torch.zeros(3, 3, 3, 3)}}, tmp_path / "models" / "RealESRGAN_x4plus.pth")
    with pytest.raises(RecipeError, match="`hires.upscaler`: .*not a Real-ESRGAN/ESRGAN weight file"):
        load_recipe(tmp_path / "packshot.yaml")


def test_infotext_hires_keys_round_trip():
    from imagegen.metadata import format_parameters, hires_fields, parse_hires, parse_parameters

    extra = hires_fields(given=("width", 1536), width=1536, height=1152, steps=12, upscaler="RealESRGAN_x4plus",
                         denoise=0.35, scheduler="Euler a", first_scheduler="DPM++ 2M Karras")
    assert list(extra) == ["Denoising strength", "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler",
                           "Hires schedule type"]
    text = format_parameters(prompt="a vase", negative="", steps=30, scheduler="DPM++ 2M Karras", guidance=6.5, seed=1,
                             width=1024, height=768, model_name="m", extra=extra)
    assert "Denoising strength: 0.35, Hires resize: 1536x1152, Hires steps: 12, Hires upscaler: RealESRGAN_x4plus, " \
           "Hires sampler: Euler a, Hires schedule type: Automatic" in text
    assert parse_hires(parse_parameters(text)) == {"scale": None, "size": [1536, 1152], "steps": 12, "denoise": 0.35,
                                                   "upscaler": "RealESRGAN_x4plus", "scheduler": "Euler a"}
    # A1111's own spelling when only the width was given, and "Hires steps: 0" = the first pass's steps
    a1111 = parse_parameters("x\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Denoising strength: 0.5, "
                             "Hires resize: 1024x0, Hires steps: 0, Hires upscaler: Latent")
    assert parse_hires(a1111) == {"scale": None, "size": [1024, 0], "steps": None, "denoise": 0.5, "upscaler": "Latent",
                                  "scheduler": None}
    assert parse_hires(parse_parameters("x\nSteps: 20, Sampler: Euler, Seed: 1")) is None


def test_validate_checks_an_upscaler_file_without_torch_numpy_or_pillow(tmp_path):
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    torch.save({"params_ema": {"conv.weight": torch.zeros(3, 3, 3, 3)}}, tmp_path / "odd.pth")
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(BASE) + "hires:\n  upscaler: odd.pth\n")
    code = textwrap.dedent(f"""
        import sys
        from imagegen.cli import run_app
        try:
            run_app(["validate", r"{path}"])
        except SystemExit:
            pass
        print("HEAVY", [m for m in ("torch", "diffusers", "transformers", "numpy", "PIL") if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout and "not a Real-ESRGAN/ESRGAN weight file" in out.stderr


def test_builtin_upscaler_file(tmp_path):
    r = load(tmp_path, """
        hires:
          upscaler: builtin:demo-x4
    """, base=BASE.replace("builtin:tiny-sd15", "builtin:demo-sd15"))
    from imagegen.models import BUILTIN_FILES

    assert r.hires.upscaler == str(BUILTIN_FILES["demo-x4"].resolve()) and plan(r)[0].hires.width == 64
