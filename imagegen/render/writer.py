"""The image writer: PNG with metadata and thumbnail, encoded in threads beside the GPU loop.

The GPU loop never waits on PNG encoding: finished images go to a pool of writer threads
that encode the PNG with its metadata, make the thumbnail from the image in memory, and
write both atomically; the main thread records them in the manifest between batches
(`ImageWriter.harvest`). A full disk stops the run cleanly: what is on disk is kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import io
import os
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from imagegen import __version__
from imagegen.defaults import RECIPE_INLINE_BYTES
from imagegen.errors import DiskFullError, ImagegenError, is_disk_full
from imagegen.metadata import (
    HIRES_DENOISE, addnet_hash, format_parameters, hires_fields, input_fields, png_text_chunks, sha256_file,
)
from imagegen.plan import Job
from imagegen.recipe import Recipe
from imagegen.fsutil import write_bytes_atomic
from imagegen.store import RunStore, image_name, recipe_history_name, thumb_name

WRITER_THREADS = max(1, min(4, (os.cpu_count() or 2)))  # PNG encoders running beside the GPU
PNG_COMPRESS_LEVEL = 6  # zlib level: PIL's default; level 9 costs ~3x the time for ~2% size


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that decide the pixels."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in ("torch", "diffusers", "transformers", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return versions


FIRST_FOLDER = "first"  # run-folder subfolder of the first-pass images that `hires.keep_first` keeps


def hires_upscaler_name(upscaler: str) -> str:
    """A hires upscaler as A1111's infotext names it (`Latent`, `Lanczos`, a weight file's stem)."""
    from imagegen.defaults import HIRES_UPSCALERS

    entry = HIRES_UPSCALERS.get(upscaler)
    return entry[0] if entry else Path(upscaler).stem


def hires_provenance(job: Job, hashes: dict[str, str | None], scheduler_config: dict | None) -> list[dict]:
    """Both passes of a hires job, as the JSON records them."""
    hr = job.hires
    assert hr is not None
    n = max(hr.steps, int(hr.steps / hr.denoise))  # as engine/hires.py img2img_schedule (torch-free here)
    return [
        {"pass": first_pass_kind(job), "size": [job.width, job.height], "steps": job.steps, "scheduler": job.scheduler},
        {"pass": "hires", "size": [hr.width, hr.height], "given": list(hr.given), "upscaler": hr.upscaler,
         "upscaler_name": hires_upscaler_name(hr.upscaler), "upscaler_sha256": hashes.get(hr.upscaler),
         "denoise": hr.denoise, "steps": hr.steps, "schedule_steps": n, "scheduler": hr.scheduler,
         "strength": min(1.0, (hr.steps + 0.5) / n),  # diffusers' img2img: num_inference_steps=schedule_steps
         "scheduler_config": scheduler_config},
    ]


def first_pass_kind(job: Job) -> str:
    """`txt2img`, `img2img` or `inpaint`: what the first pass of `job` does."""
    if job.input is None:
        return "txt2img"
    return "inpaint" if job.input.mask is not None else "img2img"


def inputs_provenance(job: Job, hashes: dict[str, str | None]) -> dict:
    """A job's input photo, mask and ControlNet units as the JSON records them (paths to find
    them again, sha256 to know them)."""
    from imagegen.inputs import ALPHA

    out: dict[str, Any] = {}
    ji = job.input
    if ji is not None:
        out["input"] = {
            "pass": first_pass_kind(job), "photo": ji.photo, "photo_sha256": ji.photo_sha256, "denoise": ji.denoise,
            "steps_run": int(job.steps * ji.denoise),  # diffusers and A1111's img2img: int(steps x denoise)
            "resize": "fit and crop, centred (imagegen.inputs)",
        }
        if ji.mask is not None:
            out["input"] |= {"mask": ji.mask, "mask_sha256": ji.mask_sha256 if ji.mask != ALPHA else ji.photo_sha256,
                             "mask_blur": ji.mask_blur, "keep_unmasked": ji.keep_unmasked}
    if job.controlnet:
        out["controlnet"] = [{"model": c.model, "model_sha256": hashes.get(c.model), "image": (c.image or ji.photo) if ji else c.image,
                              "image_sha256": c.image_sha256 or (ji.photo_sha256 if ji else None), "preprocess": c.preprocess,
                              **({"low": c.low, "high": c.high} if c.preprocess == "canny" else {}),
                              "weight": c.weight, "start": c.start, "end": c.end} for c in job.controlnet]
    return out


def recipe_provenance(recipe: Recipe) -> dict:
    """The recipe as each image carries it: the full text up to `RECIPE_INLINE_BYTES`; above that
    its sha256, size and the run folder's copy (`recipe-history/<sha12>.yaml`), so that every
    image stays readable by Pillow's default text-chunk limit whatever the recipe's size."""
    out = {"name": recipe.name, "sha256": recipe.sha256, "path": str(recipe.path)}
    size = len(recipe.text.encode("utf-8"))
    if size <= RECIPE_INLINE_BYTES:
        return {**out, "text": recipe.text}
    return {**out, "text": None, "text_bytes": size, "text_file": recipe_history_name(recipe.sha256)}


def job_provenance(job: Job, recipe: Recipe | None, hashes: dict[str, str | None], engine: Any, seconds: float,
                   scheduler_config: dict | None = None, hires_scheduler_config: dict | None = None, *,
                   energy: dict | None = None) -> dict:
    """The `imagegen` JSON stored in each PNG: enough to reproduce and audit the image.
    `energy`: {"joules": per image or "not measured", "meter": ...} (see `energy_record`)."""
    extra: dict[str, Any] = {}
    if job.hires is not None:
        cfg = hires_scheduler_config if hires_scheduler_config is not None else engine.scheduler_config(job.hires.scheduler)
        extra["passes"] = hires_provenance(job, hashes, cfg)
    extra |= inputs_provenance(job, hashes)
    return {**extra,
        "imagegen": __version__,
        "recipe": recipe_provenance(recipe) if recipe else None,
        "index": job.index,
        "id": job.id,
        "family": job.family,
        "content": job.content(),
        "axes": dict(job.axes),
        "model": {"checkpoint": job.checkpoint, "sha256": hashes.get(job.checkpoint), "vae": job.vae,
                  "vae_sha256": hashes.get(job.vae) if job.vae else None},
        "embeddings": [{"name": Path(e).stem, "path": e, "sha256": hashes.get(e)} for e in job.embeddings],
        "loras": [{"name": lu.name, "path": lu.path, "weight": lu.weight, "sha256": hashes.get(lu.path),
                   "addnet_hash": hashes.get(ADDNET + lu.path)} for lu in job.loras],
        "scheduler_config": scheduler_config if scheduler_config is not None else engine.scheduler_config(job.scheduler),
        "versions": library_versions(),
        "device": engine.device,
        "dtype": engine.dtype,
        "compiled": bool(getattr(engine, "compiled", False)),
        "seconds": round(seconds, 4),
        "energy": energy if energy is not None else energy_record(None, "none"),
        "rendered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def a1111_extra_fields(job: Job, hashes: dict[str, str | None]) -> dict[str, str]:
    """`Emphasis` (when not A1111's default and the text has weight syntax: plain syntax is A1111's
    "None") and `TI hashes` (first 12 hex of each used embedding's sha256, as A1111 writes)."""
    from imagegen.prompt_syntax import A1111_EMPHASIS_NAMES, has_weight_syntax

    extra: dict[str, str] = {}
    mode = "ignore" if job.prompt_syntax == "plain" else job.emphasis
    if mode != "original" and (has_weight_syntax(job.prompt) or has_weight_syntax(job.negative)):
        extra["Emphasis"] = A1111_EMPHASIS_NAMES[mode]
    ti = [(Path(e).stem, hashes.get(e)) for e in job.embeddings]
    if any(h for _, h in ti):
        extra["TI hashes"] = ", ".join(f"{n}: {h[:12]}" for n, h in ti if h)
    return extra


def energy_record(joules: float | None, meter: str) -> dict:
    """The provenance's energy entry: measured joules per image, or "not measured" (never a guess)."""
    return {"joules": round(joules, 3) if joules is not None else "not measured", "meter": meter}


def job_parameters(job: Job, hashes: dict[str, str | None], model_name: str, *, first_pass: bool = False) -> str:
    """The A1111 `parameters` text for a job (of its first pass alone with `first_pass`)."""
    hr = job.hires
    extra = a1111_extra_fields(job, hashes)
    ji = job.input
    units = [{"preprocess": c.preprocess, "model_name": Path(c.model).stem, "model_hash": hashes.get(c.model),
              "weight": c.weight, "start": c.start, "end": c.end, "low": c.low, "high": c.high} for c in job.controlnet]
    extra |= input_fields(denoise=ji.denoise if ji else None, mask_blur=ji.mask_blur if ji and ji.mask is not None else None,
                          controlnet=units)
    if hr is not None and not first_pass:
        fields = hires_fields(given=hr.given, width=hr.width, height=hr.height, steps=hr.steps,
                              upscaler=hires_upscaler_name(hr.upscaler), denoise=hr.denoise, scheduler=hr.scheduler,
                              first_scheduler=job.scheduler)
        if ji is not None:  # `Denoising strength` is the photo's; the hires pass's gets its own key
            fields = {(HIRES_DENOISE if k == "Denoising strength" else k): v for k, v in fields.items()}
        extra |= fields
    return format_parameters(
        prompt=job.prompt, negative=job.negative, steps=job.steps, scheduler=job.scheduler, guidance=job.guidance, seed=job.seed,
        width=job.width, height=job.height, model_name=model_name, model_hash=hashes.get(job.checkpoint),
        loras=[(lu.name, lu.weight, hashes.get(ADDNET + lu.path)) for lu in job.loras], clip_skip=job.clip_skip,
        version=f"imagegen {__version__}", extra=extra,
    )


def encode_png(image: Any, parameters: str, provenance: dict) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_text_chunks(parameters, provenance), compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


@dataclass
class EncodedImage:
    """One finished image as bytes, ready to write: the PNG with its metadata, its sha256, the
    thumbnail JPEG, and a hires job's first-pass PNG. Made where the image was generated (a writer
    thread here, a Ray actor on another machine) and written by `write_encoded`."""

    png: bytes
    sha256: str
    thumb: bytes
    first: bytes | None = None


def encode_job(image: Any, parameters: str, provenance: dict, first: tuple[Any, str] | None = None) -> EncodedImage:
    """Encode a job's image (and `first`: a hires job's first pass, (image, parameters)) as bytes."""
    from imagegen.thumbs import make_thumbnail, thumbnail_jpeg

    first_png = encode_png(first[0], first[1], {**provenance, "first_pass": True}) if first is not None else None
    data = encode_png(image, parameters, provenance)
    return EncodedImage(data, hashlib.sha256(data).hexdigest(), thumbnail_jpeg(make_thumbnail(image)), first_png)


def write_encoded(store: RunStore, job: Job, encoded: EncodedImage) -> tuple[Path, str, Path]:
    """Writer thread: the PNG and its thumbnail, each atomic. Returns (png, sha256, thumb). A hires
    job's first pass goes to `first/` under the same name, before the final image (so a final
    image on disk always has its first pass)."""
    from imagegen.thumbs import write_thumbnail

    if encoded.first is not None:
        folder = store.folder / FIRST_FOLDER
        folder.mkdir(exist_ok=True)
        write_bytes_atomic(folder / image_name(job.index, job.id), encoded.first)
    path = store.images / image_name(job.index, job.id)
    write_bytes_atomic(path, encoded.png)
    thumb = store.thumbs / thumb_name(job.index, job.id)
    write_thumbnail(encoded.thumb, thumb)
    return path, encoded.sha256, thumb


def _write_job(store: RunStore, job: Job, image: Any, parameters: str, provenance: dict,
               first: tuple[Any, str] | None = None) -> tuple[Path, str, Path]:
    """Writer thread: encode, then write (`encode_job`, `write_encoded`)."""
    return write_encoded(store, job, encode_job(image, parameters, provenance, first))


ADDNET = "addnet:"  # `file_hashes` key prefix of a LoRA's AddNet hash (what A1111's `Lora hashes` shows)


def file_hashes(jobs: Iterable[Job]) -> dict[str, str | None]:
    """sha256 of every model, VAE and LoRA file the jobs use (cached across runs), and under
    `ADDNET + path` each LoRA's AddNet hash."""
    out: dict[str, str | None] = {}
    for job in jobs:
        upscaler = job.hires.upscaler if job.hires and os.path.isabs(job.hires.upscaler) else None
        for ref in (job.checkpoint, job.vae, *(lu.path for lu in job.loras), *job.embeddings, upscaler,
                    *(c.model for c in job.controlnet)):
            if ref and ref not in out:
                out[ref] = sha256_file(ref) if Path(ref).exists() else None
        for lu in job.loras:
            if ADDNET + lu.path not in out:
                out[ADDNET + lu.path] = addnet_hash(lu.path) if Path(lu.path).is_file() else None
    return out


class ImageWriter:
    """Writer threads for one render: `submit` queues an image, `harvest` records what is written.

    `on_written(job, seconds, path)` is called for each image recorded in the manifest. After a
    full disk (while writing a file or the manifest) further images are not recorded: `full_disk`
    holds what happened, `left` counts the images given up (the next start adopts or redoes them)."""

    def __init__(self, store: RunStore, on_written: Callable[[Job, float, Path], None], *, threads: int = WRITER_THREADS) -> None:
        self.store = store
        self.on_written = on_written
        self.full_disk: list[str] = []
        self.left = 0
        self._pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imagegen-writer")
        self._inflight: deque[tuple[Job, float, cf.Future, float | None]] = deque()

    def submit(self, job: Job, image: Any, parameters: str, provenance: dict, seconds: float,
               first: tuple[Any, str] | None = None, joules: float | None = None) -> None:
        """Queue an image (and a hires job's first pass: (image, parameters)) for writing;
        `joules`: its measured energy for the manifest (None = not measured)."""
        self._inflight.append((job, seconds, self._pool.submit(_write_job, self.store, job, image, parameters, provenance, first),
                               joules))

    def submit_encoded(self, job: Job, encoded: EncodedImage, seconds: float, joules: float | None = None) -> None:
        """Queue an image encoded elsewhere (`encode_job` in a Ray actor) for writing; recorded
        by `harvest` exactly as a `submit`ted one."""
        self._inflight.append((job, seconds, self._pool.submit(write_encoded, self.store, job, encoded), joules))

    def harvest(self, block: bool, backlog: int = 0) -> None:
        """Record finished writes in order; with `block`, wait for all. Also waits while more than
        `backlog` images are queued (bounds the memory held by images not yet written)."""
        store = self.store
        while self._inflight and (block or self._inflight[0][2].done() or len(self._inflight) > backlog):
            job, seconds, fut, joules = self._inflight.popleft()
            try:
                path, sha, thumb = fut.result()
            except OSError as exc:
                if is_disk_full(exc) or self.full_disk:  # after a full disk, the next start sorts it out
                    self.full_disk.append(f"{store.images}: {exc.strerror or exc}")
                    self.left += 1
                    continue
                raise ImagegenError(f"cannot write {store.images / image_name(job.index, job.id)}: {exc.strerror or exc}") from None
            try:
                store.mark_done(job.id, file=path, sha256=sha, thumb=thumb, seconds=seconds, joules=joules)
            except DiskFullError as exc:  # the image is on disk; the next start adopts it
                self.full_disk.append(exc.message)
                self.left += 1
                continue
            self.on_written(job, seconds, path)

    def close(self) -> None:
        """Stop the threads (after `harvest(block=True)` has recorded what they wrote)."""
        self._pool.shutdown(wait=True)
