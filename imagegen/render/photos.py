"""A render's input photos: each job's photo and mask prepared at its size (`imagegen.inputs`),
decoded once per render, and the photos' thumbnails for the sheets.

Privacy: photos are read where they are; the only pixels of them written anywhere are the
thumbnails under the run folder's `thumbs/inputs/` (one per photo, named by its sha256).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

from imagegen import inputs
from imagegen.plan import ControlUse, Job, JobInput

MAX_CACHED = 64  # prepared photos and masks kept between batches


@dataclass(frozen=True)
class PhotoJob:
    """What preparing a job's photos reads (a `plan.Job` has the same attributes): for a job
    rebuilt from an image's metadata (`imagegen reproduce`)."""

    input: JobInput | None
    controlnet: tuple[ControlUse, ...]
    width: int
    height: int
    hires: Any = None  # anything with `width` and `height`: the hires pass's size


AnyJob = Union[Job, PhotoJob]


def photo_job(content: dict, provenance: dict, hires: Any = None) -> PhotoJob:
    """The PhotoJob of an image from its imagegen JSON: the canonical `content` names the
    files by sha256, the provenance's `input` / `controlnet` by path."""
    ci, pi = content.get("input"), provenance.get("input") or {}
    job_input = None
    if ci:
        mask = None if "mask" not in ci else (inputs.ALPHA if ci["mask"] == inputs.ALPHA else pi.get("mask"))
        job_input = JobInput(pi.get("photo", ""), ci["photo"], float(ci["denoise"]), mask,
                             ci["mask"] if mask not in (None, inputs.ALPHA) else None, float(ci.get("mask_blur", 0)),
                             bool(ci.get("keep_unmasked", True)))
    units = []
    for cu, pu in zip(content.get("controlnet") or [], (provenance.get("controlnet") or []) + [{}] * 8):
        own = cu["image"] != "photo"
        units.append(ControlUse(cu["model"], pu.get("image") if own else None, cu["image"] if own else None, cu["preprocess"],
                                int(cu.get("low", 0)), int(cu.get("high", 0)), float(cu["weight"]), float(cu["start"]),
                                float(cu["end"])))
    w, h = content["size"]
    return PhotoJob(job_input, tuple(units), int(w), int(h), hires)


class PhotoCache:
    """`init_request(job)`: the engine's InitRequest of a job (None without a photo); photos and
    masks are decoded, checked against their sha256 and resized once per render and size."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def _get(self, key: tuple, make: Any) -> Any:
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            hit = self._cache[key] = make()
        return hit

    def photo(self, job: AnyJob, width: int, height: int, *, straight: bool = False) -> Any:
        ji = job.input
        assert ji is not None
        return self._get(("photo", ji.photo_sha256, width, height, straight),
                         lambda: inputs.load_photo(ji.photo, width, height, ji.photo_sha256, straight=straight))

    def mask(self, job: AnyJob, width: int, height: int, blur: float) -> Any:
        ji = job.input
        assert ji is not None and ji.mask is not None
        return self._get(("mask", ji.photo_sha256, ji.mask_sha256 or ji.mask, width, height, blur),
                         lambda: inputs.load_mask(ji.mask, ji.photo, width, height, blur, mask_sha256=ji.mask_sha256,
                                                  photo_sha256=ji.photo_sha256))

    def control_requests(self, job: AnyJob) -> tuple:
        """The engine's ControlRequests of a job: each unit's image (its own file, or the job's
        photo) fitted to the job's size and preprocessed (canny), made once per render."""
        from imagegen.engine import ControlRequest

        out = []
        for c in job.controlnet:
            path, sha = (c.image, c.image_sha256) if c.image else (job.input.photo, job.input.photo_sha256)  # type: ignore[union-attr]
            image = self._get(("control", sha, job.width, job.height, c.preprocess, c.low, c.high),
                              lambda: control_image(path, sha, job.width, job.height, c.preprocess, c.low, c.high))
            out.append(ControlRequest(c.model, image, c.weight, c.start, c.end))
        return tuple(out)

    def init_request(self, job: AnyJob) -> Any:
        from imagegen.engine import InitRequest

        ji = job.input
        if ji is None:
            return None
        w, h = job.width, job.height
        mask = self.mask(job, w, h, ji.mask_blur) if ji.mask is not None else None
        cutout = ji.mask == inputs.ALPHA  # pasted back by its alpha, in its own colours
        final_image = final_mask = keep_image = None
        if mask is not None and ji.keep_unmasked:
            keep_image = self.photo(job, w, h, straight=True) if cutout else None
            if job.hires is not None:
                hw, hh = job.hires.width, job.hires.height
                final_image = self.photo(job, hw, hh, straight=cutout)
                final_mask = self.mask(job, hw, hh, hires_blur(ji.mask_blur, w, hw))
        return InitRequest(self.photo(job, w, h), ji.denoise, mask, ji.keep_unmasked, final_image, final_mask, keep_image)


def control_image(path: str, sha256: str, width: int, height: int, preprocess: str, low: int, high: int) -> Any:
    """A ControlNet unit's control image: the file fitted to the job's size (transparency black),
    then the preprocessor (`canny`: white edges on black; `none`: the image is the control map)."""
    from imagegen.engine.controlnet import prepare_control_image

    image = prepare_control_image(inputs.open_image(path, sha256), width, height)
    if preprocess == "canny":
        from imagegen.canny import canny

        image = canny(image, low, high)
    return image


def hires_blur(blur: float, width: int, hires_width: int) -> float:
    """The mask blur at the hires size: `mask_blur` is in first-pass pixels, scaled with the image."""
    return blur * hires_width / width


def write_input_thumbs(thumbs: Path, jobs: Iterable[Job]) -> None:
    """A thumbnail of each job's photo under `thumbs/inputs/` (kept when already there).
    A photo that cannot be read is left for the render to report."""
    from imagegen.errors import InputError
    from imagegen.thumbs import make_thumbnail, save_thumbnail_atomic

    done: set[str] = set()
    for job in jobs:
        ji = job.input
        if ji is None or ji.photo_sha256 in done:
            continue
        done.add(ji.photo_sha256)
        target = inputs.thumbnail_path(thumbs, ji.photo_sha256)
        if target.is_file():
            continue
        try:
            thumb = make_thumbnail(inputs.flatten(inputs.open_image(ji.photo, ji.photo_sha256)))
        except (OSError, ValueError, InputError):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        save_thumbnail_atomic(thumb, target)
