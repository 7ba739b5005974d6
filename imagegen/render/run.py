"""Render a recipe's pending jobs into its run folder.

    prepare (plan, sync, reconcile, pending) -> engine batches -> writer threads -> manifest

No printing here: progress goes out as event dicts to `on_event`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from imagegen.errors import ImagegenError, InputError, disk_full, is_disk_full
from imagegen.metadata import stoppable
from imagegen.plan import Job
from imagegen.recipe import Recipe
from imagegen.render.batching import Batches, FailureStreak, RenderStopped
from imagegen.render.budget import Budget, BudgetCheck
from imagegen.render.prepare import prepare_run
from imagegen.render.writer import ImageWriter, file_hashes, job_parameters, job_provenance
from imagegen.store import RunStore

Event = dict[str, Any]


@dataclass
class RenderOptions:
    device: str | None = None
    dtype: str | None = None
    limit: int | None = None  # render at most this many pending jobs
    retry_failed: bool = False
    batch_size: int | None = None  # overrides the recipe's batch_size
    allow_download: bool = False
    refresh_every: float = 600.0  # seconds between `on_refresh` calls during a long render
    wait_device: bool = False  # wait for another imagegen rendering on the same GPU instead of refusing
    budget: Budget | None = None  # stop before the next batch would pass it (render/budget.py)
    compile: bool | None = None  # torch.compile the UNet and VAE decoder (Engine.compile); None: `render.compile` of the recipe, else of the defaults file
    verify: bool = False  # before rendering, compare every done image with its sha256; render damaged ones again


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
    joules: float | None = None  # measured energy of this render's batches; None = not measured
    budget_reached: str | None = None  # why the render stopped before its last batch

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds > 0 else 0.0


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
    try:
        with contextlib.ExitStack() as hold:  # the device lock, from the model load to the end
            return _render(recipe, store, options or RenderOptions(), on_event, should_stop, on_refresh, open_engine,
                           hold)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(store.folder, exc.filename or "writing") from None
        raise


def _render(recipe: Recipe, store: RunStore, opts: RenderOptions, on_event: Callable[[Event], None],
            should_stop: Callable[[], str | None], on_refresh: Callable[[], None] | None,
            open_engine: Callable[..., Any] | None, hold: contextlib.ExitStack) -> RenderSummary:
    started = time.monotonic()

    def emit(event: Event) -> None:
        event = {"ts": round(time.time(), 3), **event}  # the same stamp in log.jsonl and on --json stdout
        try:
            store.log(event)
        except OSError:
            pass  # a full disk must not hide the real event
        on_event(event)

    compile_ = compile_wanted(recipe, opts)  # a bad defaults file stops here, before the run folder is touched
    # 1. Plan, and make the run folder agree with it.
    run = prepare_run(recipe, store, retry_failed=opts.retry_failed, limit=opts.limit, verify=opts.verify)
    summary = RenderSummary(recipe.name, str(store.folder), len(run.jobs), already_done=run.start_event["done"], left=run.left)
    emit(run.start_event)
    if not run.pending:
        summary.seconds = time.monotonic() - started
        emit({"event": "finish", **_summary_event(summary)})
        return summary

    # 2. Check every file before loading anything heavy, then load the model once.
    from imagegen.energy import meter_for
    from imagegen.engine import EngineDeviceError
    from imagegen.history import RateLog, job_model

    from imagegen.render.photos import PhotoCache, write_input_thumbs

    write_input_thumbs(store.thumbs, run.jobs)  # the sheets show each photo beside its renders
    photos = PhotoCache()
    with stoppable(should_stop):  # hashing multi-GB files honours SIGINT/SIGTERM (StoppedError)
        engine, hashes = _load(recipe, run.pending, opts, emit, open_engine, hold)
    if compile_:
        engine.compile()
    meter = meter_for(engine.device)  # joules around each batch, or "not measured"
    rates = RateLog(engine.device)  # what each size took, for `plan` estimates of later runs
    check = BudgetCheck(opts.budget or Budget())

    def measured(batch: list[Job], seconds: float, joules: float | None) -> None:
        check.tally.add(len(batch), seconds, joules)
        j = batch[0]
        rates.add(job_model(j), j.width, j.height, j.steps, len(batch), seconds, joules)

    if check.budget.max_joules is not None and not meter.measured:
        raise InputError(f"`--max-kwh`: the energy of {engine.device} is not measured here (no NVML energy counter or "
                         "readable RAPL); use --max-hours or --until")
    batches = Batches(run.pending, opts.batch_size or recipe.batch_size)
    emit({"event": "loaded", "model": engine.model_name, "family": engine.family, "device": engine.device, "dtype": engine.dtype,
          "seconds": round(time.monotonic() - started, 2), "batch_size": batches.batch_size})

    # 3. Batches through the engine; images to the writer threads.
    def written(job: Job, seconds: float, path: Any) -> None:
        summary.rendered += 1
        emit({"event": "image", "index": job.index, "id": job.id, "seconds": round(seconds, 4), "file": str(path)})

    def fail(job: Job, error: str, seconds: float | None) -> None:
        store.mark_failed(job.id, error, seconds)
        summary.failed += 1
        summary.failures.append((job.index, error))
        emit({"event": "failed", "index": job.index, "id": job.id, "error": error})

    writer = ImageWriter(store, written)
    to_render = len(run.pending)
    render_start = last_refresh = time.monotonic()

    def emit_progress() -> None:
        """One event after each step that finished images: reporters print from this, so a line
        always shows every image finished so far (not the first of a batch)."""
        emit({"event": "progress", "rendered": summary.rendered, "failed": summary.failed, "to_render": to_render,
              "seconds": round(time.monotonic() - render_start, 3)})

    def harvest(block: bool) -> None:
        before = summary.rendered
        writer.harvest(block, backlog=4 * batches.batch_size)
        if summary.rendered != before:
            emit_progress()

    stop_reason: str | None = None
    stopped: RenderStopped | None = None  # the device or the model keeps failing
    streak = FailureStreak()
    scheduler_configs: dict[str, dict] = {}
    current_key = None
    try:
        while batches:
            stop_reason = should_stop()
            if stop_reason or writer.full_disk:
                break
            summary.budget_reached = check.stop_reason(batches.size_for(batches.queue[0]))
            if summary.budget_reached:
                break
            batch = batches.next()
            held: list[tuple] = []
            harvest(block=False)  # writes of the last batch that finished meanwhile count before the next one
            try:
                if batch[0].group_key != current_key:
                    current_key = None
                    if _switch_loras(engine, batch, held):
                        current_key = batch[0].group_key
                submitted = (_render_batch(batch, recipe, engine, hashes, batches, writer, lambda *f: held.append(f), emit,
                                           scheduler_configs, meter, measured, photos) if current_key is not None else 0)
            except EngineDeviceError as exc:
                batches.queue.extendleft(reversed(batch))  # not attempted to the end: still pending
                stopped, stop_reason = RenderStopped(f"render stopped: {exc.message}"), "a device error"
                break
            if submitted is None:
                continue
            if submitted == 0 and held and streak.failed(held):
                batches.queue.extendleft(reversed(batch))
                for failure in streak.held[: -len(held)]:
                    batches.queue.appendleft(failure[0])  # the whole streak stays pending
                stopped = RenderStopped(f"render stopped: {streak.batches} batches in a row failed "
                                        f"(last: {streak.last_error[:300]})")
                streak.release()
                stop_reason = "repeated failures"
                break
            if submitted or not held:
                batches.succeeded(batch)
                for failure in streak.release() + held:
                    fail(*failure)
            if not submitted:
                emit_progress()  # a batch of failures moves the count too
            harvest(block=False)
            if on_refresh and time.monotonic() - last_refresh > opts.refresh_every:
                harvest(block=True)
                on_refresh()
                last_refresh = time.monotonic()
        summary.left += len(batches)
    except KeyboardInterrupt:
        # A second Ctrl-C: the batch being generated is dropped, what is generated is still written.
        summary.interrupted, summary.aborted = "SIGINT", True
        raise
    finally:
        for failure in streak.release():  # a streak shorter than the limit: ordinary failures
            fail(*failure)
        try:
            harvest(block=True)
        finally:
            writer.close()
            summary.left += writer.left
            summary.seconds = time.monotonic() - render_start
            summary.batch_size = batches.batch_size
            summary.joules = check.tally.joules if meter.measured and check.tally.batches else None
            rates.save()
            if summary.aborted:
                summary.left = to_render - summary.rendered - summary.failed
                emit({"event": "finish", **_summary_event(summary)})
    summary.interrupted = stop_reason
    emit({"event": "finish", **_summary_event(summary)})
    if writer.full_disk:
        raise disk_full(store.folder, f"{summary.rendered} images finished and kept, {summary.left} left")
    if stopped is not None:
        raise RenderStopped(f"{stopped.message}; {summary.rendered} images finished, {summary.left} left pending; "
                            "fix the cause and run the same command again to resume")
    return summary


def compile_wanted(recipe: Recipe, opts: RenderOptions) -> bool:
    """Whether to compile: `--compile`/`--no-compile` (`opts.compile`), else the recipe's
    `render.compile`, else the defaults file's, else not. Raises RecipeError for a bad defaults file."""
    if opts.compile is not None:
        return opts.compile
    if recipe.render.compile is not None:
        return recipe.render.compile
    from imagegen.recipe import DEFAULTS, load_defaults_file

    from_file = load_defaults_file().compile
    return bool(DEFAULTS["render_compile"] if from_file is None else from_file)


def _switch_loras(engine: Any, batch: list[Job], held: list[tuple]) -> bool:
    """Fuse the batch's LoRA set; False (with the batch's jobs in `held` as failed) when the
    device fails while fusing. ModelError and sticky device errors propagate."""
    from imagegen.engine import EngineOOM

    try:
        engine.set_loras([(lu.path, lu.weight) for lu in batch[0].loras])
        return True
    except ImagegenError as exc:
        if not isinstance(exc, EngineOOM):
            raise
        error = exc.message
    except Exception as exc:
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
    held.extend((j, f"applying LoRAs: {error}", None) for j in batch)
    return False


def _load(recipe: Recipe, pending: list[Job], opts: RenderOptions, emit: Callable[[Event], None],
          open_engine: Callable[..., Any] | None, hold: contextlib.ExitStack, *,
          local: Callable[[str], str] = lambda path: path,
          hashes: dict[str, str | None] | None = None) -> tuple[Any, dict[str, str | None]]:
    """Check every LoRA against the model family, hash the files, take the device's lock (one
    renderer per GPU: `imagegen.devicelock`), load the model once. A Ray actor passes `local`
    (a file's path on its node, from the job's path) and the driver's `hashes`."""
    from imagegen.engine import check_lora
    from imagegen.engine import open_engine as default_open

    # The recipe read the family from the checkpoint's keys; only a hub id is known once loaded.
    family = recipe.family if recipe.family != "auto" else None
    lora_files = sorted({lu.path for j in pending for lu in j.loras})
    for path in lora_files if family else ():
        check_lora(local(path), family)
    hashes = file_hashes(pending) if hashes is None else hashes
    if open_engine is None:  # a real engine: the GPU is ours until the render ends (a caller that
        # passes its own open_engine, like the serve queue, holds the device lock itself)
        from imagegen.devicelock import device_lock
        from imagegen.devices import resolve_device

        hold.enter_context(device_lock(resolve_device(opts.device), wait=opts.wait_device,
                                       on_wait=lambda message: emit({"event": "device_wait", "message": message})))
    emit({"event": "loading", "model": recipe.checkpoint})
    engine = (open_engine or default_open)(local(recipe.checkpoint), family=recipe.family,
                                           vae=local(recipe.vae) if recipe.vae else recipe.vae, device=opts.device,
                                           dtype=opts.dtype, allow_download=opts.allow_download)
    for path in lora_files if not family else ():
        check_lora(local(path), engine.family)
    if recipe.embeddings and hasattr(engine, "set_embeddings"):
        engine.set_embeddings([local(e) for e in recipe.embeddings])
    return engine, hashes


def _render_batch(batch: list[Job], recipe: Recipe, engine: Any, hashes: dict[str, str | None], batches: Batches,
                  writer: ImageWriter, fail: Callable[[Job, str, float | None], None], emit: Callable[[Event], None],
                  scheduler_configs: dict[str, dict], meter: Any,
                  measured: Callable[[list[Job], float, float | None], None], photos: Any = None) -> int | None:
    """Generate one batch and queue its images for writing; returns how many were queued (0 when
    the batch failed: its failures went to `fail`). None when out of memory halved the batch
    size and queued the batch again."""
    from imagegen.engine import EngineOOM, GenRequest, HiresRequest

    hr = batch[0].hires  # one group key: every job of the batch has the same second pass
    hires = HiresRequest.from_content(hr.content(), keep_first=hr.keep_first) if hr else None
    if photos is None:
        from imagegen.render.photos import PhotoCache

        photos = PhotoCache()
    requests = [GenRequest(j.prompt, j.negative, j.seed, j.width, j.height, j.steps, j.guidance, j.scheduler, j.clip_skip,
                           j.prompt_syntax, j.emphasis, hires=hires, init=photos.init_request(j),
                           controlnet=photos.control_requests(j)) for j in batch]
    from imagegen.energy import Span
    from imagegen.render.writer import energy_record

    # A compiled engine runs every batch of a size through the kernels of one batch shape: a
    # short last batch of a group is padded with copies of its last request, whose images are
    # dropped (each image comes from its own seed, so the real ones do not change).
    pad = batches.size_for(batch[0]) - len(batch) if getattr(engine, "compiled", False) else 0
    requests += [requests[-1]] * max(0, pad)
    span = Span(meter).start()
    try:
        results = engine.generate(requests)[: len(batch)]
    except EngineOOM:
        if batches.out_of_memory(batch, len(requests)):
            emit({"event": "oom", "batch_size": batches.batch_size, "size": f"{batch[0].width}x{batch[0].height}",
                  "message": f"out of memory: batch size at {batch[0].width}x{batch[0].height} halved to {batches.batch_size}"})
        else:
            for j in batch:
                fail(j, "out of memory at batch size 1", None)
            return 0
        return None
    except (ImagegenError, KeyboardInterrupt):
        raise
    except Exception as exc:  # one bad batch does not stop the run (a few in a row do: the caller)
        for j in batch:
            fail(j, f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}", None)
        return 0
    span.stop()
    measured(batch, span.seconds, span.joules)
    per_image = span.seconds / len(batch)
    joules = span.joules / len(batch) if span.joules is not None else None
    energy = energy_record(joules, meter.source)
    submitted = 0
    for job, result in zip(batch, results):
        if result.error or result.image is None:
            fail(job, result.error or "no image returned", per_image)
            continue
        for name in (job.scheduler, *((job.hires.scheduler,) if job.hires else ())):
            if name not in scheduler_configs:
                scheduler_configs[name] = engine.scheduler_config(name)
        params = job_parameters(job, hashes, engine.model_name)
        prov = job_provenance(job, recipe, hashes, engine, per_image, scheduler_configs[job.scheduler],
                              scheduler_configs[job.hires.scheduler] if job.hires else None, energy=energy)
        first = (result.first, job_parameters(job, hashes, engine.model_name, first_pass=True)) if result.first is not None else None
        writer.submit(job, result.image, params, prov, per_image, first=first, joules=joules)
        submitted += 1
    return submitted


def _summary_event(s: RenderSummary) -> Event:
    return {"recipe": s.recipe, "folder": s.folder, "planned": s.planned, "already_done": s.already_done, "rendered": s.rendered,
            "failed": s.failed, "left": s.left, "seconds": round(s.seconds, 2), "images_per_second": round(s.images_per_second, 3),
            "interrupted": s.interrupted, "aborted": s.aborted, "batch_size": s.batch_size,
            "kwh": None if s.joules is None else round(s.joules / 3.6e6, 6),
            "wh_per_image": None if s.joules is None or not s.rendered else round(s.joules / s.rendered / 3600.0, 4),
            "budget_reached": s.budget_reached}
