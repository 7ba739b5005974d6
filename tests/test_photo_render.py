"""Input photos end to end: recipe -> plan -> render -> PNG metadata -> sheets -> import, on
builtin:demo-sd15 and builtin:tiny-sd15; bad inputs give one line and exit 2; resume."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from photo_fixtures import product_photo
from imagegen.cli import run_app
from imagegen.inputs import flatten, load_photo
from imagegen.metadata import parse_parameters, read_png_text, read_provenance
from imagegen.plan import plan
from imagegen.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
name: product
model:
  checkpoint: builtin:{model}
prompt: "a red circle on a {{green|yellow}} background"
seeds: [1]
size: {size}
steps: 6
guidance: 5
scheduler: Euler a
batch_size: 3
output: run
"""


def write(tmp_path: Path, extra: str, model: str = "demo-sd15", size: str = "32x32") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE).format(model=model, size=size) + textwrap.dedent(extra))
    return path


def photos(tmp_path: Path, size=(32, 32)) -> Path:
    """photos/a.png and photos/b.png: product PNGs with transparency; masks/a.png, masks/b.png."""
    folder, masks = tmp_path / "photos", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    for name, angle in (("a", 0), ("b", 90)):
        photo, mask = product_photo(size, alpha=True)
        photo.rotate(angle).save(folder / f"{name}.png")
        mask.rotate(angle).save(masks / f"{name}.png")
    return folder


def run(argv, capsys) -> tuple[int, str, str]:
    code = run_app([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_inpaint_render_metadata_sheets_and_resume(tmp_path, capsys):
    folder = photos(tmp_path)
    path = write(tmp_path, """
        init_image: photos
        denoise: [0.6, 0.9]
        mask: alpha
        mask_blur: 1
    """)
    jobs = plan(load_recipe(path))
    assert len(jobs) == 8 and {dict(j.axes)["input"] for j in jobs} == {"a.png", "b.png"}
    code, out, err = run(["render", path], capsys)
    assert code == 0, err
    runf = tmp_path / "run"
    for job in jobs:
        png = runf / "images" / f"{job.index:04d}-{job.id}.png"
        photo = flatten(Image.open(job.input.photo))
        alpha = np.asarray(Image.open(job.input.photo).getchannel("A"))
        blurred = np.asarray(load_photo_mask(job))
        keep = blurred == 0
        assert keep.sum() > 15 and (alpha[keep] == 255).all()
        assert np.array_equal(pixels(png)[keep], np.asarray(photo, dtype=np.int16)[keep])  # the product, exactly
        fields = parse_parameters(read_png_text(png)["parameters"])
        assert fields["Denoising strength"] == f"{job.input.denoise:g}" and fields["Mask blur"] == "1"
        prov = read_provenance(png)
        assert prov["content"]["input"]["photo"] == job.input.photo_sha256 and prov["input"]["photo"] == job.input.photo
        assert prov["input"]["pass"] == "inpaint" and prov["input"]["steps_run"] == int(6 * job.input.denoise)
    thumbs = sorted(p.name for p in (runf / "thumbs" / "inputs").iterdir())
    assert len(thumbs) == 2  # one thumbnail per photo: the only copy of the photos' pixels in the run
    html = (runf / "sheets" / "index.html").read_text()
    assert html.count('class="photo"') == 2 and "thumbs/inputs/" in html and str(folder) not in html
    assert html.index('data-input="a.png"') < html.index('data-input="b.png"')
    assert (runf / "sheets" / "sheet-01.jpg").is_file()
    # Resume: nothing to do again; a changed photo is a new job (its sha256 is in the id)
    code, out, err = run(["render", path], capsys)
    assert code == 0 and "0 rendered" in out + err and "8 were already done" in out + err
    assert [j.id for j in plan(load_recipe(path))] == [j.id for j in jobs]
    photo, _ = product_photo((32, 32), alpha=True)
    photo.rotate(45).save(folder / "b.png")
    again = plan(load_recipe(path))
    assert [j.id for j in again[:4]] == [j.id for j in jobs[:4]] and not {j.id for j in again[4:]} & {j.id for j in jobs}


def test_alpha_cutout_is_composited_by_its_alpha(tmp_path, capsys):
    """`mask: alpha` (blur 0 by default): every opaque pixel is the photo's exactly, every edge
    pixel the photo's colour over the render by its alpha (within rounding), no white fringe."""
    import shutil

    shutil.copy(Path(__file__).resolve().parent.parent / "recipes" / "photos" / "star.png", tmp_path / "star.png")
    path = write(tmp_path, "init_image: star.png\ndenoise: 0.9\nmask: alpha\n")
    job = plan(load_recipe(path))[0]
    assert job.input.mask_blur == 0
    assert run(["render", path, "--no-sheet"], capsys)[0] == 0
    out = pixels(tmp_path / "run" / "images" / f"{job.index:04d}-{job.id}.png")
    rgba = np.asarray(Image.open(job.input.photo).convert("RGBA"), dtype=np.float64)
    a = rgba[..., 3:] / 255
    opaque, edge = a[..., 0] == 1, (a[..., 0] > 0) & (a[..., 0] < 1)
    assert opaque.sum() > 30 and edge.sum() > 10
    assert np.array_equal(out[opaque], rgba[..., :3][opaque].astype(np.int16))
    # at an edge pixel the render's own colour r is unknown; out = a*photo + (1-a)*r means r is in 0..255
    r = (out - a * rgba[..., :3]) / np.maximum(1 - a, 1e-9)
    assert (r[edge] > -2).all() and (r[edge] < 257).all()


def load_photo_mask(job):
    from imagegen.inputs import load_mask

    return load_mask(job.input.mask, job.input.photo, job.width, job.height, job.input.mask_blur)


def test_img2img_with_hires_and_import(tmp_path, capsys):
    photo, mask = product_photo((96, 64))
    photo.save(tmp_path / "bottle.png")
    mask.save(tmp_path / "bottle-mask.png")
    path = write(tmp_path, """
        init_image: bottle.png
        denoise: 0.7
        mask: bottle-mask.png
        hires:
          scale: 1.5
          denoise: 0.5
          steps: 2
    """, model="tiny-sd15", size="64x64")
    recipe = load_recipe(path)
    assert any("cropped by 32 px of its width" in n for n in recipe.notes)
    code, out, err = run(["render", path, "--no-sheet"], capsys)
    assert code == 0, err
    jobs = plan(recipe)
    png = tmp_path / "run" / "images" / f"{jobs[0].index:04d}-{jobs[0].id}.png"
    with Image.open(png) as im:
        assert im.size == (96, 96)
    from imagegen.inputs import load_mask

    big = np.asarray(load_mask(str(tmp_path / "bottle-mask.png"), str(tmp_path / "bottle.png"), 96, 96, 4 * 1.5))
    want = np.asarray(load_photo(tmp_path / "bottle.png", 96, 96), dtype=np.int16)
    assert np.array_equal(pixels(png)[big == 0], want[big == 0])
    fields = parse_parameters(read_png_text(png)["parameters"])
    assert fields["Denoising strength"] == "0.7" and fields["Hires denoising strength"] == "0.5"
    assert read_provenance(png)["passes"][0]["pass"] == "inpaint"
    from imagegen.reproduce import reproduce_image

    assert reproduce_image(png, device="cpu").max_diff <= 1  # the photo and mask found again by path, checked by sha256
    # import gives back a recipe whose job is the same
    out_yaml = tmp_path / "back.yaml"
    code, _, err = run(["import", png, "-o", out_yaml], capsys)
    assert code == 0, err
    text = out_yaml.read_text()
    assert "init_image:" in text and "mask:" in text
    back = plan(load_recipe(out_yaml))
    assert back[0].id == jobs[0].id


@pytest.mark.parametrize("extra,needle", [
    ("init_image: missing.png\n", "image file not found"),
    ("init_image: notes.png\n", "not an image Pillow can read"),
    ("init_image: bottle.png\nmask: square.png\n", "another aspect ratio"),
    ("init_image: bottle.png\ndenoise: 0.05\n", "0 steps"),
    ("init_image: bottle.png\ndenoise: 1.5\n", "above 0 and at most 1"),
    ("init_image: bottle.png\nmask: alpha\n", "has no alpha channel"),
    ("mask: square.png\n", "has no effect without `init_image`"),
    ("init_image: bottle.png\ncontrolnet:\n  - model: cn.safetensors\n    weight: 3\n", "ControlNet file not found"),
])
def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys, extra, needle):
    photo, _ = product_photo((48, 32))
    photo.save(tmp_path / "bottle.png")
    Image.new("L", (40, 40)).save(tmp_path / "square.png")
    (tmp_path / "notes.png").write_text("not a picture")
    path = write(tmp_path, extra)
    for command in ("validate", "render"):
        code, out, err = run([command, path], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip() and "(warning)" not in ln]
        assert code == 2 and needle in err and "Traceback" not in err, (command, err)
        assert len([ln for ln in lines if ln.startswith(str(path))]) >= 1 and all(str(path) in ln for ln in lines[:1])


def test_inpainting_checkpoint_refused_for_text_to_image(tmp_path, capsys):
    from photo_fixtures import make_inpaint_file, make_inpaint_folder

    folder = make_inpaint_folder(tmp_path / "inpaint")
    single = make_inpaint_file(tmp_path / "inpaint.safetensors", folder)
    path = tmp_path / "t.yaml"
    path.write_text(f"name: t\nmodel: {{checkpoint: {single}}}\nprompt: a cat\nsize: 64x64\n")
    code, out, err = run(["validate", path], capsys)
    assert code == 2 and "inpainting model" in err and "init_image" in err and len(err.strip().splitlines()) == 1


def test_controlnet_recipe_renders_with_canny_from_the_photo(tmp_path, capsys):
    from controlnet_fixtures import make_tiny_controlnet, save_controlnet

    save_controlnet(make_tiny_controlnet("sd15", seed=3), tmp_path / "cn-canny.safetensors", layout="ldm")
    photo, mask = product_photo((64, 64))
    photo.save(tmp_path / "bottle.png")
    mask.save(tmp_path / "bottle-mask.png")
    path = write(tmp_path, """
        init_image: bottle.png
        denoise: 0.8
        mask: bottle-mask.png
        controlnet:
          - model: cn-canny.safetensors
            preprocess: canny
            low: 50
            high: 150
            weight: [0, 1]
            end: 0.8
    """, model="tiny-sd15", size="64x64")
    jobs = plan(load_recipe(path))
    assert len(jobs) == 4 and {dict(j.axes)["controlnet:0"] for j in jobs} == {"0", "1"}
    code, out, err = run(["render", path, "--no-sheet"], capsys)
    assert code == 0, err
    imgs = {j.index: tmp_path / "run" / "images" / f"{j.index:04d}-{j.id}.png" for j in jobs}
    by = {(j.seed, j.controlnet[0].weight, j.prompt): imgs[j.index] for j in jobs}
    j0 = jobs[0]
    a, b = pixels(by[(j0.seed, 0.0, j0.prompt)]), pixels(by[(j0.seed, 1.0, j0.prompt)])
    keep = np.asarray(load_photo_mask(j0)) == 0
    assert np.array_equal(a[keep], b[keep]) and np.abs(a - b)[~keep].mean() > 1
    fields = parse_parameters(read_png_text(by[(j0.seed, 1.0, j0.prompt)])["parameters"])
    assert fields["ControlNet 0"].startswith("Module: canny, Model: cn-canny [")
    assert "Weight: 1, Resize Mode: Crop and Resize, Threshold A: 50, Threshold B: 150, Guidance Start: 0, Guidance End: 0.8" in fields["ControlNet 0"]
    prov = read_provenance(by[(j0.seed, 1.0, j0.prompt)])
    assert prov["controlnet"][0]["image_sha256"] == j0.input.photo_sha256 and prov["controlnet"][0]["model_sha256"]
    from imagegen.reproduce import reproduce_image

    assert reproduce_image(by[(j0.seed, 1.0, j0.prompt)], device="cpu").max_diff <= 1
    back = tmp_path / "back.yaml"
    assert run(["import", by[(j0.seed, 1.0, j0.prompt)], "-o", back], capsys)[0] == 0
    again = plan(load_recipe(back))
    assert again[0].id in {j.id for j in jobs}
