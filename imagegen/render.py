"""Render a recipe's pending jobs into its run folder.

    plan -> run store (sync, reconcile, pending) -> engine batches -> writer threads -> manifest

The GPU loop never waits on PNG encoding: finished images go to a pool of writer threads
that encode the PNG with its metadata, make the thumbnail from the image in memory, and
write both atomically; the main thread records them in the manifest between batches.
No printing here: progress goes out as event dicts to `on_event`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import functools
import hashlib
import io
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from imagegen import __version__
from imagegen.errors import ImagegenError
from imagegen.metadata import format_parameters, png_text_chunks, read_provenance, sha256_file
from imagegen.plan import Job, plan
from imagegen.recipe import Recipe
from imagegen.fsutil import write_bytes_atomic
from imagegen.store import DiskFullError, RunStore, image_name, thumb_name

Event = dict[str, Any]
WRITER_THREADS = max(1, min(4, (os.cpu_count() or 2)))  # PNG encoders running beside the GPU
PNG_COMPRESS_LEVEL = 6  # zlib level: PIL's default; level 9 costs ~3x the time for ~2% size


@dataclass
class RenderOptions:
    device: str | None = None
    dtype: str | None = None
    limit: int | None = None  # render at most this many pending jobs
    retry_failed: bool = False
    batch_size: int | None = None  # overrides the recipe's batch_size
    allow_download: bool = False
    refresh_every: float = 600.0  # seconds between `on_refresh` calls during a long render


@dataclass
class RenderSummary:
    recipe: str
    folder: str
    planned: int
    already_done: int = 0
    rendered: int = 0
    failed: int = 0
    left: int = 0  # pending jobs not attempted (limit, interrupt, disk full)
    seconds: float = 0.0
    interrupted: str | None = None
    aborted: bool = False  # a second Ctrl-C: stopped at once, the batch being generated was dropped
    batch_size: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds > 0 else 0.0


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


def job_provenance(job: Job, recipe: Recipe | None, hashes: dict[str, str | None], engine: Any, seconds: float,
                   scheduler_config: dict | None = None) -> dict:
    """The `imagegen` JSON stored in each PNG: enough to reproduce and audit the image."""
    return {
        "imagegen": __version__,
        "recipe": {"name": recipe.name, "sha256": recipe.sha256, "path": str(recipe.path), "text": recipe.text} if recipe else None,
        "index": job.index,
        "id": job.id,
        "family": job.family,
        "content": job.content(),
        "axes": dict(job.axes),
        "model": {"checkpoint": job.checkpoint, "sha256": hashes.get(job.checkpoint), "vae": job.vae,
                  "vae_sha256": hashes.get(job.vae) if job.vae else None},
        "loras": [{"name": lu.name, "path": lu.path, "weight": lu.weight, "sha256": hashes.get(lu.path)} for lu in job.loras],
        "scheduler_config": scheduler_config if scheduler_config is not None else engine.scheduler_config(job.scheduler),
        "versions": library_versions(),
        "device": engine.device,
        "dtype": engine.dtype,
        "seconds": round(seconds, 4),
        "rendered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def job_parameters(job: Job, hashes: dict[str, str | None], model_name: str) -> str:
    """The A1111 `parameters` text for a job."""
    return format_parameters(
        prompt=job.prompt, negative=job.negative, steps=job.steps, scheduler=job.scheduler, guidance=job.guidance, seed=job.seed,
        width=job.width, height=job.height, model_name=model_name, model_hash=hashes.get(job.checkpoint),
        loras=[(lu.name, lu.weight, hashes.get(lu.path)) for lu in job.loras], clip_skip=job.clip_skip,
        version=f"imagegen {__version__}",
    )


def encode_png(image: Any, parameters: str, provenance: dict) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_text_chunks(parameters, provenance), compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _write_job(store: RunStore, job: Job, image: Any, parameters: str, provenance: dict) -> tuple[Path, str, Path]:
    """Writer thread: PNG with metadata and its thumbnail, both atomic. Returns (png, sha256, thumb)."""
    from imagegen.thumbs import make_thumbnail, save_thumbnail_atomic

    data = encode_png(image, parameters, provenance)
    path = store.images / image_name(job.index, job.id)
    write_bytes_atomic(path, data)
    thumb = store.thumbs / thumb_name(job.index, job.id)
    save_thumbnail_atomic(make_thumbnail(image), thumb)
    return path, hashlib.sha256(data).hexdigest(), thumb


def remake_thumbnail(image_path: Path, thumb_path: Path) -> None:
    """Rebuild a thumbnail a crash left out (the only time a full render is decoded again)."""
    from PIL import Image

    from imagegen.thumbs import make_thumbnail, save_thumbnail_atomic

    with Image.open(image_path) as im:
        save_thumbnail_atomic(make_thumbnail(im.convert("RGB")), thumb_path)


def verify_image(path: Path, job_id: str) -> bool:
    """True when `path` is a complete PNG of ours for `job_id` (used to adopt files after a crash)."""
    prov = read_provenance(path)
    if not prov or prov.get("id") != job_id:
        return False
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def file_hashes(jobs: Iterable[Job]) -> dict[str, str | None]:
    """sha256 of every model, VAE and LoRA file the jobs use (cached across runs)."""
    out: dict[str, str | None] = {}
    for job in jobs:
        for ref in (job.checkpoint, job.vae, *(lu.path for lu in job.loras)):
            if ref and ref not in out:
                out[ref] = sha256_file(ref) if Path(ref).exists() else None
    return out


def render_recipe(
    recipe: Recipe,
    store: RunStore,
    *,
    options: RenderOptions | None = None,
    on_event: Callable[[Event], None] = lambda e: None,
    should_stop: Callable[[], str | None] = lambda: None,
    on_refresh: Callable[[], None] | None = None,
    open_engine: Callable[..., Any] | None = None,
) -> RenderSummary:
    """Render the recipe's pending jobs into `store`; returns a summary.

    `should_stop()` returns a reason (e.g. "SIGTERM") to stop after the current batch; what
    is generated is still written. Raises DiskFullError when the disk fills (finished images
    are kept and recorded), ModelError / InputError for unusable models."""
    opts = options or RenderOptions()
    started = time.monotonic()

    def emit(event: Event) -> None:
        event = {"ts": round(time.time(), 3), **event}  # the same stamp in log.jsonl and on --json stdout
        try:
            store.log(event)
        except OSError:
            pass  # a full disk must not hide the real event
        on_event(event)

    # 1. Plan, and make the run folder agree with it.
    jobs = plan(recipe)
    by_id = {j.id: j for j in jobs}
    store.freeze_recipe(recipe.text, recipe.sha256, recipe.name)
    store.set_meta("upscale", json.dumps(dataclasses.asdict(recipe.upscale)))  # paths already absolute
    old_ids = {r.index: r.id for r in store.rows()}
    sync = store.sync_plan([j.to_dict() for j in jobs])
    rec = store.reconcile(verify=verify_image)
    from imagegen.runsheets import remap_picks

    picks_moved, picks_orphaned = remap_picks(store, old_ids)
    for _, image_path, thumb_path in rec.missing_thumbs:
        remake_thumbnail(image_path, thumb_path)
    pending = [by_id[i] for i in store.pending_ids(retry_failed=opts.retry_failed)]
    counts = store.counts()
    summary = RenderSummary(recipe.name, str(store.folder), len(jobs), already_done=counts["done"])
    if opts.limit is not None:
        summary.left = max(0, len(pending) - opts.limit)
        pending = pending[: opts.limit]
    emit({"event": "start", "recipe": recipe.name, "folder": str(store.folder), "planned": len(jobs), "done": counts["done"],
          "failed": counts["failed"], "to_render": len(pending), "new": sync["new"], "orphaned": sync["orphaned"],
          "adopted": rec.adopted, "temp_removed": rec.temp_removed, "reset_missing": rec.reset_missing,
          "renamed": rec.renamed, "untracked": rec.untracked, "picks_moved": picks_moved, "picks_orphaned": picks_orphaned})
    if not pending:
        summary.seconds = time.monotonic() - started
        emit({"event": "finish", **_summary_event(summary)})
        return summary

    # 2. Check every file before loading anything heavy, then load the model once.
    from imagegen.engine import EngineOOM, GenRequest, check_lora
    from imagegen.engine import open_engine as default_open

    # The recipe read the family from the checkpoint's keys; only a hub id is known once loaded.
    family = recipe.family if recipe.family != "auto" else None
    lora_files = sorted({lu.path for j in pending for lu in j.loras})
    for path in lora_files if family else ():
        check_lora(path, family)
    hashes = file_hashes(pending)
    emit({"event": "loading", "model": recipe.checkpoint})
    engine = (open_engine or default_open)(recipe.checkpoint, family=recipe.family, vae=recipe.vae, device=opts.device,
                                           dtype=opts.dtype, allow_download=opts.allow_download)
    for path in lora_files if not family else ():
        check_lora(path, engine.family)
    batch_size = opts.batch_size or recipe.batch_size
    emit({"event": "loaded", "model": engine.model_name, "family": engine.family, "device": engine.device, "dtype": engine.dtype,
          "seconds": round(time.monotonic() - started, 2), "batch_size": batch_size})

    # 3. Group: jobs sharing model state and latent shape, costly LoRA switches outermost.
    groups: dict[tuple, list[Job]] = {}
    for job in pending:
        groups.setdefault(job.group_key, []).append(job)
    ordered = list(groups.values())  # plan order already keeps each LoRA stack together

    to_render = len(pending)
    pool = cf.ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="imagegen-writer")
    inflight: deque[tuple[Job, float, cf.Future]] = deque()
    disk_full: list[str] = []
    render_start = time.monotonic()
    last_refresh = render_start

    def harvest(block: bool) -> None:
        before = summary.rendered
        _harvest(block)
        if summary.rendered != before:
            emit_progress()

    def emit_progress() -> None:
        """One event after each step that finished images: reporters print from this, so a line
        always shows every image finished so far (not the first of a batch)."""
        emit({"event": "progress", "rendered": summary.rendered, "failed": summary.failed, "to_render": to_render,
              "seconds": round(time.monotonic() - render_start, 3)})

    def _harvest(block: bool) -> None:
        while inflight and (block or inflight[0][2].done() or len(inflight) > 4 * batch_size):
            job, seconds, fut = inflight.popleft()
            try:
                path, sha, thumb = fut.result()
            except OSError as exc:
                if exc.errno == errno.ENOSPC or disk_full:  # after a full disk, the next start sorts it out
                    disk_full.append(f"{store.images}: {exc.strerror or exc}")
                    summary.left += 1
                    continue
                raise ImagegenError(f"cannot write {store.images / image_name(job.index, job.id)}: {exc.strerror or exc}") from None
            try:
                store.mark_done(job.id, file=path, sha256=sha, thumb=thumb, seconds=seconds)
            except DiskFullError as exc:  # the image is on disk; the next start adopts it
                disk_full.append(exc.message)
                summary.left += 1
                continue
            summary.rendered += 1
            emit({"event": "image", "index": job.index, "id": job.id, "seconds": round(seconds, 4), "file": str(path)})

    def fail(job: Job, error: str, seconds: float | None) -> None:
        store.mark_failed(job.id, error, seconds)
        summary.failed += 1
        summary.failures.append((job.index, error))
        emit({"event": "failed", "index": job.index, "id": job.id, "error": error})

    stop_reason: str | None = None
    scheduler_configs: dict[str, dict] = {}
    try:
        queue = deque(j for g in ordered for j in g)
        current_key = None
        while queue:
            stop_reason = should_stop()
            if stop_reason or disk_full:
                break
            group = [queue.popleft()]
            while queue and len(group) < batch_size and queue[0].group_key == group[0].group_key:
                group.append(queue.popleft())
            if group[0].group_key != current_key:
                engine.set_loras([(lu.path, lu.weight) for lu in group[0].loras])
                current_key = group[0].group_key
            harvest(block=False)  # writes of the last batch that finished meanwhile count before the next one
            requests = [GenRequest(j.prompt, j.negative, j.seed, j.width, j.height, j.steps, j.guidance, j.scheduler, j.clip_skip)
                        for j in group]
            t0 = time.monotonic()
            try:
                results = engine.generate(requests)
            except EngineOOM:
                if batch_size == 1:
                    for j in group:
                        fail(j, "CUDA out of memory at batch size 1", None)
                    continue
                batch_size = max(1, batch_size // 2)
                emit({"event": "oom", "batch_size": batch_size,
                      "message": f"CUDA out of memory: batch size halved to {batch_size}"})
                queue.extendleft(reversed(group))
                continue
            except ImagegenError:
                raise
            except Exception as exc:  # one bad batch does not stop the run
                for j in group:
                    fail(j, f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}", None)
                continue
            per_image = (time.monotonic() - t0) / len(group)
            for job, result in zip(group, results):
                if result.error or result.image is None:
                    fail(job, result.error or "no image returned", per_image)
                    continue
                if job.scheduler not in scheduler_configs:
                    scheduler_configs[job.scheduler] = engine.scheduler_config(job.scheduler)
                params = job_parameters(job, hashes, engine.model_name)
                prov = job_provenance(job, recipe, hashes, engine, per_image, scheduler_configs[job.scheduler])
                inflight.append((job, per_image, pool.submit(_write_job, store, job, result.image, params, prov)))
            if not any(not r.error and r.image is not None for r in results):
                emit_progress()  # a batch of failures moves the count too
            harvest(block=False)
            if on_refresh and time.monotonic() - last_refresh > opts.refresh_every:
                harvest(block=True)
                on_refresh()
                last_refresh = time.monotonic()
        summary.left += len(queue)
    except KeyboardInterrupt:
        # A second Ctrl-C: the batch being generated is dropped, what is generated is still written.
        summary.interrupted, summary.aborted = "SIGINT", True
        raise
    finally:
        try:
            harvest(block=True)
        finally:
            pool.shutdown(wait=True)
            summary.seconds = time.monotonic() - render_start
            summary.batch_size = batch_size
            if summary.aborted:
                summary.left = to_render - summary.rendered - summary.failed
                emit({"event": "finish", **_summary_event(summary)})
    summary.interrupted = stop_reason
    emit({"event": "finish", **_summary_event(summary)})
    if disk_full:
        raise DiskFullError(f"disk full while writing into {store.folder}: {summary.rendered} images finished and kept, "
                            f"{summary.left} left; free some space and run the same command again to resume")
    return summary


def _summary_event(s: RenderSummary) -> Event:
    return {"recipe": s.recipe, "folder": s.folder, "planned": s.planned, "already_done": s.already_done, "rendered": s.rendered,
            "failed": s.failed, "left": s.left, "seconds": round(s.seconds, 2), "images_per_second": round(s.images_per_second, 3),
            "interrupted": s.interrupted, "aborted": s.aborted, "batch_size": s.batch_size}
