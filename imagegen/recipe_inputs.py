"""The recipe keys of input photos: `init_image`, `denoise`, `mask`, `mask_blur`, `keep_unmasked`
and `controlnet` units. Torch-free; called by `recipe.py`, which owns the YAML and positions.

Every input image is read here once (its header and its sha256, no pixels decoded), so that
plan can name it by hash: a new photo under the same name is a new job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen import inputs as I
from imagegen.errors import InputError, ModelError
from imagegen.fsutil import not_a_regular_file
from imagegen.modelfiles import check_controlnet

SCHEMA_KEYS = ("init_image", "denoise", "mask", "mask_blur", "keep_unmasked")
CONTROLNET_SCHEMA = [{"model": None, "image": None, "preprocess": None, "low": None, "high": None, "weight": None,
                      "start": None, "end": None}]

# --- defaults: one place, one comment each ---------------------------------------------------
DEFAULTS: dict[str, Any] = {
    "denoise": 0.75,  # A1111's img2img default denoising strength
    "mask_blur": 4,  # px, A1111's default mask blur (for mask files)
    "mask_blur_alpha": 0,  # px, for `mask: alpha`: a cut-out's alpha edge is soft already; a blur would eat the product
    "keep_unmasked": True,  # paste the photo back outside the (blurred) mask: the product is never re-drawn
    "controlnet_preprocess": "none",  # the unit's image is already a control map
    "canny_low": 100,  # A1111's canny thresholds (0-255 gradient scale)
    "canny_high": 200,
    "controlnet_weight": 1.0,  # A1111's default control weight
    "controlnet_start": 0.0,  # guidance from the first step...
    "controlnet_end": 1.0,  # ...to the last
}
PREPROCESSORS = ("none", "canny")  # `controlnet[].preprocess` values
MAX_MASK_BLUR = 256  # px


@dataclass(frozen=True)
class ControlUnitSpec:
    """One `controlnet:` unit. `image` None: the control image is made from each `init_image`.
    `weights` is a sweep axis."""

    model: str  # absolute path of a .safetensors ControlNet
    image: I.InputFile | None
    preprocess: str  # one of PREPROCESSORS
    low: int  # canny thresholds (used when preprocess is canny)
    high: int
    weights: tuple[float, ...]
    start: float
    end: float


@dataclass(frozen=True)
class InputsSpec:
    """The recipe's input photos. `photos` and `denoise` are sweep axes; `masks[i]` goes with
    `photos[i]` (an InputFile, `inputs.ALPHA`, or None without `mask:`)."""

    photos: tuple[I.InputFile, ...] = ()
    labels: tuple[str, ...] = ()  # axis label of each photo
    denoise: tuple[float, ...] = ()
    masks: tuple[I.InputFile | str | None, ...] = ()
    mask_blur: float = DEFAULTS["mask_blur"]
    keep_unmasked: bool = DEFAULTS["keep_unmasked"]
    controlnet: tuple[ControlUnitSpec, ...] = ()

    @property
    def img2img(self) -> bool:
        return bool(self.photos)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 60 else text[:57] + "..."


def _path_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip()) and "\x00" not in v


def _probe(doc: Any, where: tuple, path: Path, what: str) -> I.InputFile | None:
    try:
        return I.probe(path)
    except InputError as exc:
        doc.problem(where, f"{what}: {exc.message}")
        return None


def _photos(doc: Any, data: dict, base: Path) -> tuple[list[I.InputFile], list[tuple]]:
    """The `init_image` files: one file, a list of files, or a folder (its images by name)."""
    raw = data["init_image"]
    items = raw if isinstance(raw, list) else [raw]
    if isinstance(raw, list) and not raw:
        doc.problem(("init_image",), "`init_image` is an empty list; give at least one image file")
    out: list[I.InputFile] = []
    wheres: list[tuple] = []
    for i, item in enumerate(items):
        where = ("init_image", i) if isinstance(raw, list) else ("init_image",)
        if not _path_text(item):
            doc.problem(where, f"`init_image` must be an image file or a folder of images, got {_show(item)}")
            continue
        p = (base / Path(item).expanduser()).resolve() if not Path(item).expanduser().is_absolute() else Path(item).expanduser()
        if p.is_dir():
            files = I.list_folder(p)
            if not files:
                doc.problem(where, f"`init_image` folder `{p}` has no images ({', '.join(I.IMAGE_SUFFIXES)})")
            for f in files:
                found = _probe(doc, where, f, "`init_image`")
                if found:
                    out.append(found)
                    wheres.append(where)
            continue
        found = _probe(doc, where, p, "`init_image`")
        if found:
            out.append(found)
            wheres.append(where)
    seen: dict[str, str] = {}
    for f, where in zip(out, wheres):
        if f.sha256 in seen:
            doc.problem(where, f"`init_image`: `{f.path}` and `{seen[f.sha256]}` are the same image (same sha256); list it once")
        seen.setdefault(f.sha256, f.path)
    return out, wheres


def _labels(photos: list[I.InputFile]) -> list[str]:
    """File names, made unique with the hash where two folders hold the same name."""
    names = [f.name for f in photos]
    return [f"{f.name} {f.short[:8]}" if names.count(f.name) > 1 else f.name for f in photos]


def _masks(doc: Any, data: dict, base: Path, photos: list[I.InputFile], wheres: list[tuple]) -> list:
    raw = data["mask"]
    where = ("mask",)
    if raw == I.ALPHA:
        for f, w in zip(photos, wheres):
            if not f.has_alpha:
                doc.problem(w, f"`mask: alpha`: `{f.path}` has no alpha channel (transparency) to use as the mask")
        return [I.ALPHA] * len(photos)
    if not _path_text(raw):
        doc.problem(where, f"`mask` must be an image file, a folder of masks named like the photos, or `alpha`, got {_show(raw)}")
        return [None] * len(photos)
    p = Path(raw).expanduser()
    p = p if p.is_absolute() else (base / p).resolve()
    if p.is_dir():
        by_stem = {f.stem: f for f in I.list_folder(p)}
        out: list = []
        for f in photos:
            m = by_stem.get(Path(f.path).stem)
            if m is None:
                doc.problem(where, f"`mask` folder `{p}` has no mask for `{f.name}` (a mask named `{Path(f.path).stem}.png`, "
                                   "or another image suffix)")
                out.append(None)
                continue
            out.append(_probe(doc, where, m, "`mask`"))
    else:
        one = _probe(doc, where, p, "`mask`")
        out = [one] * len(photos)
    for f, m in zip(photos, out):
        if isinstance(m, I.InputFile):
            problem = I.mask_size_problem((m.width, m.height), (f.width, f.height))
            if problem:
                doc.problem(where, f"`mask` `{m.path}` {problem.replace('its photo', f'the photo `{f.name}`')}")
    return out


def _denoise(doc: Any, data: dict, steps: tuple[int, ...]) -> tuple[float, ...]:
    raw = data.get("denoise", DEFAULTS["denoise"])
    items = raw if isinstance(raw, list) else [raw]
    if isinstance(raw, list) and not raw:
        doc.problem(("denoise",), "`denoise` is an empty list; give at least one value")
    out: list[float] = []
    for i, v in enumerate(items):
        where = ("denoise", i) if isinstance(raw, list) else ("denoise",)
        if not _is_num(v) or not 0 < v <= 1:
            doc.problem(where, f"`denoise` must be a number above 0 and at most 1 (1 = repaint all), got {_show(v)}")
            continue
        if float(v) in out:
            doc.problem(where, f"`denoise` lists {v:g} twice")
            continue
        for n in steps:
            if int(n * v) < 1:  # diffusers and A1111's img2img run int(steps * denoise) steps
                doc.problem(where, f"`denoise: {v:g}` with {n} steps runs int({n} x {v:g}) = 0 steps; raise `denoise` "
                                   f"to at least {1 / n:.3g} or `steps`")
                break
        out.append(float(v))
    return tuple(out)


def _number(doc: Any, unit: dict, where: tuple, key: str, lo: float, hi: float, default: float) -> float:
    v = unit.get(key, default)
    if not _is_num(v) or not lo <= v <= hi:
        doc.problem(where + (key,), f"`controlnet.{key}` must be a number from {lo:g} to {hi:g}, got {_show(v)}")
        return default
    return float(v)


def _controlnet(doc: Any, data: dict, base: Path, family: str, has_photos: bool) -> list[ControlUnitSpec]:
    raw = data["controlnet"]
    if not isinstance(raw, list) or not raw:
        doc.problem(("controlnet",), f"`controlnet` must be a list of units ({{model, image, preprocess, weight, start, end}}), "
                                     f"got {_show(raw)}")
        return []
    units = []
    for i, unit in enumerate(raw):
        where = ("controlnet", i)
        if not isinstance(unit, dict) or "model" not in unit:
            doc.problem(where, f"a `controlnet` unit must be a mapping with `model:` (and `image`, `preprocess`, `weight`, "
                               f"`start`, `end`), got {_show(unit)}")
            continue
        model = ""
        m = unit["model"]
        if not _path_text(m):
            doc.problem(where + ("model",), f"`controlnet.model` must be a .safetensors ControlNet file, got {_show(m)}")
        else:
            mp = Path(m).expanduser()
            mp = mp if mp.is_absolute() else (base / mp)
            special = not_a_regular_file(mp)
            if special:
                doc.problem(where + ("model",), f"ControlNet `{mp}` {special}")
            elif not mp.is_file():
                doc.missing_file(where + ("model",), f"ControlNet file not found: `{mp}`")
            else:
                try:
                    check_controlnet(mp, family)
                except ModelError as exc:
                    doc.problem(where + ("model",), exc.message)
            model = str(mp.resolve())
        image = None
        if "image" in unit:
            if not _path_text(unit["image"]):
                doc.problem(where + ("image",), f"`controlnet.image` must be an image file, got {_show(unit['image'])}")
            else:
                ip = Path(unit["image"]).expanduser()
                image = _probe(doc, where + ("image",), ip if ip.is_absolute() else (base / ip).resolve(), "`controlnet.image`")
        elif not has_photos:
            doc.problem(where, "a `controlnet` unit needs `image:` (its control image) when the recipe has no `init_image`")
        pre = unit.get("preprocess", DEFAULTS["controlnet_preprocess"])
        if pre not in PREPROCESSORS:
            doc.problem(where + ("preprocess",), f"`controlnet.preprocess` must be one of {', '.join(PREPROCESSORS)}, got {_show(pre)}")
            pre = "none"
        low, high = DEFAULTS["canny_low"], DEFAULTS["canny_high"]
        for key in ("low", "high"):
            if key in unit and pre != "canny":
                doc.problem(where + (key,), f"`controlnet.{key}` is a canny threshold; it has no effect without `preprocess: canny`",
                            key=True)
        if pre == "canny":
            low = int(_number(doc, unit, where, "low", 0, 255, low))
            high = int(_number(doc, unit, where, "high", 0, 255, high))
            for key in ("low", "high"):
                if key in unit and not isinstance(unit[key], int):
                    doc.problem(where + (key,), f"`controlnet.{key}` must be a whole number from 0 to 255, got {_show(unit[key])}")
            if low > high:
                doc.problem(where + ("low",), f"`controlnet.low` ({low}) must not be above `controlnet.high` ({high})")
        raw_w = unit.get("weight", DEFAULTS["controlnet_weight"])
        w_items = raw_w if isinstance(raw_w, list) else [raw_w]
        if isinstance(raw_w, list) and not raw_w:
            doc.problem(where + ("weight",), "`controlnet.weight` is an empty list; give at least one weight")
        weights: list[float] = []
        for j, w in enumerate(w_items):
            wp = where + (("weight", j) if isinstance(raw_w, list) else ("weight",))
            if not _is_num(w) or not 0 <= w <= 2:
                doc.problem(wp, f"`controlnet.weight` must be a number from 0 to 2, got {_show(w)}")
            elif float(w) in weights:
                doc.problem(wp, f"`controlnet.weight` lists {w:g} twice")
            else:
                weights.append(float(w))
        start = _number(doc, unit, where, "start", 0, 1, DEFAULTS["controlnet_start"])
        end = _number(doc, unit, where, "end", 0, 1, DEFAULTS["controlnet_end"])
        if start >= end:
            doc.problem(where + ("end",), f"`controlnet.end` ({end:g}) must be above `controlnet.start` ({start:g})")
        units.append(ControlUnitSpec(model, image, pre, low, high, tuple(weights) or (1.0,), start, end))
    return units


def read(doc: Any, data: dict, base: Path, *, family: str, inpainting_model: bool, sizes: tuple, steps: tuple,
         checkpoint: str) -> InputsSpec:
    """Read and check the keys (problems go to `doc`); an empty InputsSpec without them."""
    has_photos = "init_image" in data
    for key in ("denoise", "mask"):
        if key in data and not has_photos:
            doc.problem((key,), f"`{key}` has no effect without `init_image` (the photo to start from)", key=True)
    for key in ("mask_blur", "keep_unmasked"):
        if key in data and "mask" not in data:
            doc.problem((key,), f"`{key}` has no effect without `mask`", key=True)
    if inpainting_model and not has_photos and checkpoint:
        doc.problem(("model", "checkpoint"), f"`{Path(checkpoint).name}` is an inpainting model (its UNet takes 9 input "
                                             "channels): it renders img2img and inpainting jobs only; give `init_image:` "
                                             "(and `mask:`), or use a base checkpoint for text-to-image")
    photos: list[I.InputFile] = []
    wheres: list[tuple] = []
    if has_photos:
        photos, wheres = _photos(doc, data, base)
    denoise = _denoise(doc, data, steps) if has_photos else ()
    masks: list = [None] * len(photos)
    if "mask" in data and photos:
        masks = _masks(doc, data, base, photos, wheres)
    blur = data.get("mask_blur", DEFAULTS["mask_blur_alpha"] if data.get("mask") == I.ALPHA else DEFAULTS["mask_blur"])
    if not _is_num(blur) or not 0 <= blur <= MAX_MASK_BLUR:
        doc.problem(("mask_blur",), f"`mask_blur` must be a number of pixels from 0 to {MAX_MASK_BLUR}, got {_show(blur)}")
        blur = DEFAULTS["mask_blur"]
    keep = data.get("keep_unmasked", DEFAULTS["keep_unmasked"])
    if not isinstance(keep, bool):
        doc.problem(("keep_unmasked",), f"`keep_unmasked` must be true or false, got {_show(keep)}")
        keep = True
    units = _controlnet(doc, data, base, family, bool(photos)) if "controlnet" in data else []
    for f in photos:
        for w, h in sizes:
            note = I.crop_note(f, w, h)
            if note:
                doc.notes.append(f"{doc.at(('init_image',))}: {note} (the resize rule: scale to cover, cut the centre)")
    return InputsSpec(tuple(photos), tuple(_labels(photos)), denoise, tuple(masks), float(blur), keep, tuple(units))
