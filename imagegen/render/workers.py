"""Several workers on one machine: one process per GPU (or N CPU workers), one run.

    parent: prepare (as a one-worker render) -> queue the pending jobs in the manifest
            -> start the workers -> one event stream for the whole run -> finish
    worker: load the model once -> claim a batch (a lease it renews) -> engine -> writer
            threads -> record and release each job -> claim again ... until the queue is empty

Workers are `multiprocessing` spawn processes; each opens the run's manifest without the run
lock (the parent holds it) and claims batches inside a transaction (`RunStore.claim`), keeping
a LoRA set's jobs on the worker that already has it loaded. A worker that dies loses its claims
at once (the parent sees it exit) or when its lease runs out (a hung one); the others take the
jobs up. Nothing is rendered twice: a claim is handed out again only while its job is neither
done nor failed in this run, and the parent counts one image per job id. SIGTERM (or Ctrl-C)
at the parent asks every worker to finish its batch, write it and stop; the run resumes like
any other. A second Ctrl-C kills the workers at once (written images are kept).

No printing here: events go to `on_event`, as from `render_recipe`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from multiprocessing.connection import wait as wait_readable
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from imagegen.errors import ImagegenError, InputError, disk_full, is_disk_full
from imagegen.recipe import Recipe
from imagegen.render.prepare import prepare_run
from imagegen.render.run import Event, RenderOptions, RenderSummary, _summary_event, compile_wanted
from imagegen.store import RunStore

LEASE_SECONDS = 60.0  # a claim a worker stops renewing is handed out again after this long
POLL_SECONDS = 0.2  # how often the parent looks at its workers, and an idle worker at the queue


def group_name(job: Any) -> str:
    """The claim group of a job: its batch group key (same model state, LoRA set, latent shape)."""
    return repr(job.group_key)


def worker_devices(*, workers: int | None = None, gpus: str | None = None, device: str | None = None) -> list[str]:
    """The device of each worker: `gpus` "all" or "0,2" (one worker per GPU), else `workers`
    copies of `device` (default cpu). Raises InputError for a bad list or a GPU that is not there."""
    if gpus is not None and workers is not None:
        raise InputError("--gpus and --workers: give one (--gpus starts one worker per GPU)")
    if gpus is None:
        if workers is None or workers < 1:
            raise InputError("--workers takes a number of workers, 1 or more")
        return [device or "cpu"] * workers
    if device is not None and not device.startswith("cuda"):
        raise InputError(f"--gpus renders on CUDA GPUs; --device {device} does not go with it")
    spec = gpus.strip().lower()
    if spec == "all":
        count = _cuda_count()
        if not count:
            raise InputError("--gpus all: no CUDA GPU is visible (use --workers N --device cpu on a CPU machine)")
        return [f"cuda:{i}" for i in range(count)]
    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--gpus {gpus!r}: give `all` or GPU indices such as 0,2") from None
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise InputError(f"--gpus {gpus!r}: give `all` or distinct GPU indices such as 0,2")
    count = _cuda_count()
    missing = [i for i in indices if i >= count]
    if missing:
        raise InputError(f"--gpus {gpus}: GPU {missing[0]} is not there ({count} CUDA GPUs visible)")
    return [f"cuda:{i}" for i in indices]


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_run(recipe: Recipe, store: RunStore, opts: RenderOptions,
              on_event: Callable[[Event], None]) -> tuple[Callable[[Event], None], Any, RenderSummary]:
    """The first steps of a render with several workers (processes or Ray actors): an `emit` that
    stamps each event and logs it to log.jsonl before `on_event`, the prepared run
    (`prepare_run`) and its summary. Raises DiskFullError for a full disk."""

    def emit(event: Event) -> None:
        event = {"ts": round(time.time(), 3), **event}
        try:
            store.log(event)
        except OSError:
            pass
        on_event(event)

    try:
        run = prepare_run(recipe, store, retry_failed=opts.retry_failed, limit=opts.limit, verify=opts.verify)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(store.folder, exc.filename or "writing") from None
        raise
    summary = RenderSummary(recipe.name, str(store.folder), len(run.jobs), already_done=run.start_event["done"], left=run.left)
    return emit, run, summary


@dataclass
class WorkerArgs:
    """What a spawned worker needs (pickled to it)."""

    name: str
    device: str
    folder: str
    recipe: Recipe
    pending_ids: list[str]
    options: RenderOptions
    threads: int | None = None  # torch CPU threads (CPU workers share the cores)
    lease: float = LEASE_SECONDS


@dataclass
class _Worker:
    name: str
    device: str
    process: Any
    reader: Any  # the parent's end of the worker's event pipe
    loaded: bool = False
    exited: dict | None = None  # the worker's own exit report
    lost: bool = False  # died without one (kill -9, crash)
    error: str | None = None


def render_with_workers(
    recipe: Recipe,
    store: RunStore,
    devices: list[str],
    *,
    options: RenderOptions | None = None,
    on_event: Callable[[Event], None] = lambda e: None,
    should_stop: Callable[[], str | None] = lambda: None,
    on_refresh: Callable[[], None] | None = None,
    lease: float = LEASE_SECONDS,
    threads: int | None = None,
) -> RenderSummary:
    """Render the recipe's pending jobs with one worker process per entry of `devices`; the
    same summary and events as `render_recipe` (events of one worker carry its name). Raises
    `threads` sets torch's CPU threads per CPU worker (default: the cores shared out). Raises
    the first worker's ImagegenError when every worker stopped on it with jobs left, and
    ImagegenError when every worker died with jobs left."""
    opts = options or RenderOptions()
    if compile_wanted(recipe, opts):  # never silently eager: workers do not compile yet
        raise InputError("`render.compile` (the recipe or the defaults file) works with a single-process render; "
                         "not with `--workers`/`--gpus` yet: pass --no-compile to render eager with workers")
    started = time.monotonic()
    emit, run, summary = start_run(recipe, store, opts, on_event)
    emit({**run.start_event, "workers": len(devices)})
    if not run.pending:
        summary.seconds = time.monotonic() - started
        emit({"event": "finish", **_summary_event(summary)})
        return summary
    from imagegen.render.photos import write_input_thumbs

    write_input_thumbs(store.thumbs, run.jobs)  # the sheets show each photo beside its renders

    store.queue_jobs([(j.id, j.index, group_name(j)) for j in run.pending])
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    cpu_workers = sum(1 for d in devices if d.startswith("cpu"))
    threads = threads or (max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None)
    pending_ids = [j.id for j in run.pending]
    workers, child_ends = [], []
    for i, device in enumerate(devices):
        args = WorkerArgs(f"w{i}", device, str(store.folder), recipe, pending_ids, opts,
                          threads if device.startswith("cpu") else None, lease)
        reader, writer_end = ctx.Pipe(duplex=False)  # a pipe each: a worker killed mid-send breaks only its own
        proc = ctx.Process(target=worker_main, args=(args, writer_end, stop), name=f"imagegen-{args.name}")
        workers.append(_Worker(args.name, device, proc, reader))
        child_ends.append(writer_end)
    for w, end in zip(workers, child_ends):
        w.process.start()
        end.close()  # only the worker holds its write end now: its death reads as end of file
    by_name = {w.name: w for w in workers}
    open_readers = {w.reader: w for w in workers}

    seen: set[str] = set()  # one image per job id, whatever a worker that lost its lease does
    to_render = len(run.pending)
    render_start: float | None = None
    last_image: float | None = None
    last_refresh = time.monotonic()

    def progress() -> None:
        emit({"event": "progress", "rendered": summary.rendered, "failed": summary.failed, "to_render": to_render,
              "seconds": round(time.monotonic() - (render_start or started), 3)})

    def handle(msg: dict) -> None:
        nonlocal render_start, last_image
        kind, w = msg["event"], by_name[msg["worker"]]
        if kind == "loaded":
            w.loaded = True
            if render_start is None:
                render_start = time.monotonic()
                emit({**msg, "event": "loaded", "workers": len(workers), "seconds": round(time.monotonic() - started, 2)})
            else:
                emit({**msg, "event": "worker_loaded"})
        elif kind == "image":
            if msg["id"] in seen:
                return
            seen.add(msg["id"])
            summary.rendered += 1
            last_image = time.monotonic()
            emit(msg)
            progress()
        elif kind == "failed":
            summary.failed += 1
            summary.failures.append((msg["index"], msg["error"]))
            emit(msg)
            progress()
        elif kind == "exit":
            w.exited = msg
            w.error = msg.get("error")
            emit({**msg, "event": "worker_exit"})
        else:  # loading, device_wait, oom, ...
            emit(msg)

    def drain(timeout: float) -> None:
        for reader in wait_readable(list(open_readers), timeout):
            try:
                while reader.poll():
                    handle(reader.recv())
            except (EOFError, OSError):  # the worker's end closed: exited, or killed
                del open_readers[reader]

    stop_reason: str | None = None
    try:
        while True:
            drain(POLL_SECONDS)
            if stop_reason is None:
                stop_reason = should_stop()
                if stop_reason:
                    stop.set()
            for w in workers:
                if w.exited is None and not w.lost and w.process.exitcode is not None:
                    drain(0)  # its last messages may still be in the pipe
                    if w.exited is None:
                        w.lost = True
                        given_back = store.unclaim_worker(w.name)
                        store.set_worker_state(w.name, "lost")
                        emit({"event": "worker_lost", "worker": w.name, "device": w.device, "exitcode": w.process.exitcode,
                              "requeued": given_back,
                              "message": f"worker {w.name} ({w.device}) died (exit code {w.process.exitcode}); "
                                         f"its {given_back} claimed jobs go back to the others"})
            if all(w.exited is not None or w.lost for w in workers):
                break
            if on_refresh and time.monotonic() - last_refresh > opts.refresh_every:
                on_refresh()
                last_refresh = time.monotonic()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; written images are kept
        summary.interrupted, summary.aborted = "SIGINT", True
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
        raise
    finally:
        for w in workers:
            w.process.join(timeout=30)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
        for w in workers:
            store.unclaim_worker(w.name)
        for w in workers:
            w.reader.close()
        left = store.queued()
        store.clear_queue()
        summary.left += left["waiting"] + left["claimed"]
        summary.seconds = (last_image or time.monotonic()) - (render_start or started)  # not the workers' exit
        summary.batch_size = opts.batch_size or recipe.batch_size
        if summary.aborted:
            emit({"event": "finish", **_summary_event(summary)})
    summary.interrupted = stop_reason
    emit({"event": "finish", **_summary_event(summary), "workers": len(workers),
          "lost": [w.name for w in workers if w.lost]})
    if summary.left and not stop_reason:
        errors = [w.error for w in workers if w.error]
        if errors:
            raise ImagegenError(errors[0])
        raise ImagegenError(f"every worker stopped with {summary.left} jobs left "
                            f"({', '.join(w.name + ' died' if w.lost else w.name + ' stopped' for w in workers)}); "
                            "render the recipe again to resume")
    return summary


# --- the worker process -------------------------------------------------------------------------


def worker_main(args: WorkerArgs, events: Any, stop: Any) -> None:  # events: the write end of a Pipe
    """A worker's process: load once, claim and render until the queue is empty or `stop`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a SIGTERM to a worker stops the whole run cleanly
    name = args.name

    def send(event: Event) -> None:
        events.send({"ts": round(time.time(), 3), **event, "worker": name})

    report: dict = {"event": "exit", "rendered": 0, "failed": 0}
    store = None
    try:
        store = RunStore.open(args.folder, create=False, lock=False)
        store.register_worker(name, pid=os.getpid(), device=args.device)
        report.update(_work(args, store, send, stop))
    except ImagegenError as exc:
        report["error"] = exc.message
    except OSError as exc:
        report["error"] = str(disk_full(args.folder, exc.filename or "writing").message) if is_disk_full(exc) else \
            f"worker {name}: {exc}"
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                store.unclaim_worker(name)
                store.set_worker_state(name, "failed" if report.get("error") else "stopped")
            store.close()
        send(report)
        events.close()


def _work(args: WorkerArgs, store: RunStore, send: Callable[[Event], None], stop: Any) -> dict:
    from imagegen.plan import plan
    from imagegen.render.batching import Batches
    from imagegen.render.run import _load, _render_batch
    from imagegen.render.writer import ImageWriter

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    name, recipe = args.name, args.recipe
    opts = RenderOptions(**{**vars(args.options), "device": args.device})
    by_id = {j.id: j for j in plan(recipe)}
    pending = [by_id[i] for i in args.pending_ids if i in by_id]
    counts = {"rendered": 0, "failed": 0}
    loaded_at = time.monotonic()

    def written(job: Any, seconds: float, path: Any) -> None:
        store.release([job.id], name)
        counts["rendered"] += 1
        send({"event": "image", "index": job.index, "id": job.id, "seconds": round(seconds, 4), "file": str(path)})

    def fail(job: Any, error: str, seconds: float | None) -> None:
        store.mark_failed(job.id, error, seconds)
        store.release([job.id], name)
        counts["failed"] += 1
        send({"event": "failed", "index": job.index, "id": job.id, "error": error})

    with contextlib.ExitStack() as hold:
        engine, hashes = _load(recipe, pending, opts, send, None, hold)
        batch_size = opts.batch_size or recipe.batch_size
        loaded_at = time.monotonic()
        send({"event": "loaded", "pid": os.getpid(), "model": engine.model_name, "family": engine.family, "device": engine.device,
              "dtype": engine.dtype, "batch_size": batch_size})
        store.set_worker_state(name, "rendering")
        beat = _Heartbeat(args.folder, name, args.lease, lambda: (counts["rendered"], time.monotonic() - loaded_at))
        hold.callback(beat.stop)
        writer = ImageWriter(store, written)
        hold.callback(writer.close)
        scheduler_configs: dict[str, dict] = {}
        from imagegen.energy import meter_for

        meter = meter_for(engine.device)  # each worker measures its own device ("not measured" on most CPUs)
        current_group: str | None = None
        current_key = None
        try:
            while not stop.is_set() and not writer.full_disk:
                ids = store.claim(name, batch_size, lease=args.lease, prefer_group=current_group)
                if not ids:
                    writer.harvest(block=True)  # my own claims are released once written
                    left = store.queued()
                    if not left["waiting"] and not left["claimed"]:
                        break  # the queue is empty: done
                    time.sleep(POLL_SECONDS)  # others hold the rest; their jobs come back if they die
                    continue
                jobs = [by_id[i] for i in ids]
                current_group = group_name(jobs[0])
                if jobs[0].group_key != current_key:
                    engine.set_loras([(lu.path, lu.weight) for lu in jobs[0].loras])
                    current_key = jobs[0].group_key
                batches = Batches(jobs, batch_size)
                while batches:
                    batch = batches.next()
                    _render_batch(batch, recipe, engine, hashes, batches, writer, fail, send, scheduler_configs, meter,
                                  lambda *measurement: None)  # budgets are the single-process render's (see README)
                    writer.harvest(block=False, backlog=4 * batches.batch_size)
                batch_size = batches.batch_size  # an out-of-memory halving holds for the next claims
        finally:
            writer.harvest(block=True)
            store.renew(name, lease=args.lease, rendered=counts["rendered"], seconds=time.monotonic() - loaded_at)
        if writer.full_disk:
            raise disk_full(store.folder, f"worker {name}: {counts['rendered']} images finished and kept")
    return counts


class _Heartbeat:
    """Renews a worker's leases (and records its figures) from a thread with its own connection."""

    def __init__(self, folder: str, name: str, lease: float, figures: Callable[[], tuple[int, float]]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(folder, name, lease, figures), daemon=True,
                                        name=f"imagegen-lease-{name}")
        self._thread.start()

    def _run(self, folder: str, name: str, lease: float, figures: Callable[[], tuple[int, float]]) -> None:
        with RunStore.open(folder, create=False, lock=False) as store:
            while not self._stop.wait(max(0.05, lease / 4)):
                rendered, seconds = figures()
                with contextlib.suppress(Exception):  # a busy manifest: the next beat renews
                    store.renew(name, lease=lease, rendered=rendered, seconds=seconds)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
