"""Input-photo recipe keys, plan ids, the resize rule and the infotext keys: no model loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from photo_fixtures import product_photo
from imagegen.errors import RecipeError
from imagegen.importer import from_infotext
from imagegen.inputs import crop_box, fit, load_mask, mask_size_problem, paste_unmasked
from imagegen.metadata import input_fields, parse_controlnet, parse_parameters
from imagegen.plan import plan
from imagegen.recipe import load_recipe

BASE = """
name: p
model: {checkpoint: builtin:demo-sd15}
prompt: a red circle
size: 32x32
steps: 10
seeds: 2
"""


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(BASE) + textwrap.dedent(extra))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    return exc.value.problems


def test_resize_rule_fits_and_crops_centred():
    assert crop_box(64, 64, 32, 32) == (0, 0, 64, 64)
    assert crop_box(96, 64, 64, 64) == (16, 0, 80, 64)  # the centre square of a 3:2 photo
    assert crop_box(64, 128, 64, 64) == (0, 32, 64, 96)
    wide = Image.new("RGB", (96, 64), "black")
    wide.paste((255, 255, 255), (16, 0, 80, 64))
    assert np.asarray(fit(wide, 32, 32))[:, 2:30].min() >= 250  # the white centre, scaled (Lanczos rings at the cut)
    same = Image.effect_noise((32, 32), 40).convert("RGB")
    assert np.array_equal(np.asarray(fit(same, 32, 32)), np.asarray(same))  # a photo of the job's size is used as is
    assert mask_size_problem((48, 32), (96, 64)) is None and mask_size_problem((40, 40), (96, 64))


def test_mask_follows_the_photo_and_paste_back_is_exact(tmp_path):
    photo, mask = product_photo((96, 64))
    photo.save(tmp_path / "p.png")
    mask.resize((48, 32)).save(tmp_path / "half.png")  # same aspect, half size: scaled to the photo first
    m = load_mask(str(tmp_path / "half.png"), str(tmp_path / "p.png"), 64, 64, 0)
    want = fit(mask, 64, 64)
    assert np.abs(np.asarray(m, dtype=int) - np.asarray(want, dtype=int)).mean() < 8
    rendered = Image.new("RGB", (64, 64), (0, 255, 0))
    out = np.asarray(paste_unmasked(rendered, fit(photo, 64, 64), m))
    keep = np.asarray(m) == 0
    assert np.array_equal(out[keep], np.asarray(fit(photo, 64, 64))[keep]) and (out[np.asarray(m) == 255] == (0, 255, 0)).all()


def test_photos_are_an_axis_and_their_hash_is_in_the_id(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, angle in (("a", 0), ("b", 90), ("c", 180)):
        product_photo((32, 32))[0].rotate(angle + 1).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    path = write(tmp_path, "init_image: photos\ndenoise: [0.5, 0.7]\n")
    jobs = plan(load_recipe(path))
    assert len(jobs) == 12 and [dict(j.axes)["input"] for j in jobs[::4]] == ["a.png", "b.png", "c.png"]
    assert len({j.id for j in jobs}) == 12 and len({j.group_key for j in jobs}) == 2  # a batch: one denoise
    text = path.read_text()
    plain = plan(load_recipe(write(tmp_path, "")))
    assert "input" not in plain[0].content() and not {j.id for j in plain} & {j.id for j in jobs}
    path.write_text(text)
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    path.write_text(text.replace("init_image: photos", "init_image: elsewhere"))
    assert [j.id for j in plan(load_recipe(path))] == [j.id for j in jobs]  # named by content, not path


def test_mask_folder_alpha_and_problems(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "masks").mkdir()
    photo, mask = product_photo((32, 32), alpha=True)
    photo.save(tmp_path / "photos" / "a.png")
    photo.rotate(90).save(tmp_path / "photos" / "b.png")
    mask.save(tmp_path / "masks" / "a.png")
    found = problems(write(tmp_path, "init_image: photos\nmask: masks\n"))
    assert len(found) == 1 and "no mask for `b.png`" in found[0] and found[0].startswith(f"{tmp_path / 'r.yaml'}:9:")
    mask.rotate(90).save(tmp_path / "masks" / "b.jpg")
    jobs = plan(load_recipe(write(tmp_path, "init_image: photos\nmask: masks\nmask_blur: 2\nkeep_unmasked: false\n")))
    assert jobs[0].input.mask.endswith("masks/a.png") and jobs[-1].input.mask.endswith("masks/b.jpg")
    assert jobs[0].input.content()["keep_unmasked"] is False
    alpha = plan(load_recipe(write(tmp_path, "init_image: photos\nmask: alpha\n")))
    assert alpha[0].input.content()["mask"] == "alpha"
    for extra, needle in [
        ("init_image: photos\nmask_blur: 3\n", "`mask_blur` has no effect without `mask`"),
        ("init_image: photos\ndenoise: []\n", "empty list"),
        ("init_image: photos\ndenoise: [0.5, 0.5]\n", "lists 0.5 twice"),
        ("init_image: [photos/a.png, photos/a.png]\n", "same image"),
        ("init_image: photos\ncontrolnet:\n  - {model: x.safetensors, preprocess: sobel}\n", "must be one of none, canny"),
        ("controlnet:\n  - {model: x.safetensors}\n", "needs `image:`"),
        ("init_image: photos\ncontrolnet:\n  - {model: x.safetensors, start: 0.8, end: 0.2}\n", "must be above"),
        ("init_image: photos\ncontrolnet:\n  - {model: x.safetensors, low: 10}\n", "no effect without `preprocess: canny`"),
        ("init_image: photos\ncontrolnet:\n  - {model: x.safetensors, wieght: 1}\n", "did you mean `weight`"),
    ]:
        assert any(needle in p for p in problems(write(tmp_path, extra))), (extra, problems(write(tmp_path, extra)))


def test_controlnet_file_checks(tmp_path):
    from engine_fixtures import fake_checkpoint_shapes, write_fake_safetensors

    write_fake_safetensors(tmp_path / "ckpt.safetensors", fake_checkpoint_shapes("sd15"))
    write_fake_safetensors(tmp_path / "cn-xl.safetensors", {"controlnet_cond_embedding.conv_in.weight": (4, 3, 3, 3),
                                                            "controlnet_mid_block.weight": (4, 4, 1, 1),
                                                            "add_embedding.linear_1.weight": (4, 8)})
    product_photo((32, 32))[0].save(tmp_path / "p.png")
    found = problems(write(tmp_path, "init_image: p.png\ncontrolnet:\n  - {model: ckpt.safetensors}\n"))
    assert "not a ControlNet model" in found[0] and "Stable Diffusion checkpoint" in found[0]
    found = problems(write(tmp_path, "init_image: p.png\ncontrolnet:\n  - {model: cn-xl.safetensors}\n"))
    assert "an SDXL ControlNet, but the model is SD1.5" in found[0]


def test_infotext_keys_round_trip_and_import():
    fields = input_fields(denoise=0.6, mask_blur=4, controlnet=[
        {"preprocess": "canny", "model_name": "control_v11p_sd15_canny", "model_hash": "d14c016b0123", "weight": 0.8,
         "start": 0.0, "end": 0.8, "low": 100, "high": 200}])
    assert fields["ControlNet 0"] == ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.8, Resize Mode: "
                                      "Crop and Resize, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 0.8")
    from imagegen.metadata import format_parameters

    text = format_parameters(prompt="a bottle", negative="", steps=20, scheduler="Euler a", guidance=7, seed=3, width=512,
                             height=512, model_name="sd15", extra=fields)
    parsed = parse_parameters(text)
    assert parsed["Denoising strength"] == "0.6" and parsed["Mask blur"] == "4"
    unit = parse_controlnet(parsed)[0]
    assert unit == {"module": "canny", "model": "control_v11p_sd15_canny", "model_hash": "d14c016b", "weight": 0.8,
                    "start": 0.0, "end": 0.8, "low": 100, "high": 200}
    imported = from_infotext(text, "x")
    assert "init_image: PHOTO.png" in imported.text and "denoise: 0.6" in imported.text and "mask_blur: 4.0" in imported.text
    assert "control_v11p_sd15_canny.safetensors" in imported.text and any("init_image" in n for n in imported.notes)


def test_validate_and_plan_stay_torch_free(tmp_path):
    product_photo((32, 32))[0].save(tmp_path / "p.png")
    path = write(tmp_path, "init_image: p.png\nmask: alpha\n".replace("mask: alpha\n", ""))
    code = ("import sys; from imagegen.recipe import load_recipe; from imagegen.plan import plan; "
            f"plan(load_recipe({str(path)!r})); print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_photo_changed_after_planning_is_one_clear_error(tmp_path):
    from imagegen.errors import InputError
    from imagegen.inputs import load_photo, probe

    product_photo((32, 32))[0].save(tmp_path / "p.png")
    found = probe(tmp_path / "p.png")
    assert load_photo(found.path, 32, 32, found.sha256).size == (32, 32)
    product_photo((32, 32))[0].rotate(90).save(tmp_path / "p.png")
    with pytest.raises(InputError, match="changed since the recipe was read"):
        load_photo(found.path, 32, 32, found.sha256)
