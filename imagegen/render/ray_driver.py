"""Several machines through Ray: this process drives, Ray actors render.

    driver: prepare (as a one-process render) -> sha256 of every file the jobs use -> connect to
            the Ray cluster -> queue the pending jobs in the manifest -> one actor per GPU of the
            cluster (or N CPU actors) -> for each actor: claim a batch (`RunStore.claim`, a LoRA
            set's jobs kept on the actor that has it fused) and send it -> write what comes back
            with the run's writer threads (`ImageWriter.submit_encoded`) -> claim again ... -> finish
    actor:  `imagegen.render.ray_actor`: check the files, load once, render, encode

The run folder and its SQLite manifest stay on the driver's machine (SQLite must not live on a
network share); actors send the encoded PNGs back, so no shared filesystem is needed. An actor
(or its node) that dies: its claimed jobs go back to the queue at once, another actor takes them
and a replacement actor is started while the slot has restarts left (`REPLACEMENTS`). Nothing is
written twice: an actor's results are taken once per job id, and a dead actor's never arrive.
The driver killed: its actors die with it (Ray owns them through the driver); the next `render
--ray` resumes from the manifest like any run. SIGTERM or Ctrl-C: no new batch is sent, what the
actors are rendering is written, then the run stops; a second Ctrl-C kills the actors at once.

Private by default: `RAY_USAGE_STATS_ENABLED=0` before Ray is imported and in every actor's
environment, no dashboard, the actors' logs stay on their nodes (`log_to_driver=False`).

No printing here: events go to `on_event`, as from `render_recipe`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from imagegen import __version__
from imagegen.clusterconfig import ClusterConfig
from imagegen.errors import ImagegenError, InputError, disk_full
from imagegen.metadata import stoppable
from imagegen.recipe import Recipe
from imagegen.render.run import Event, RenderOptions, RenderSummary, _summary_event, compile_wanted
from imagegen.render.workers import LEASE_SECONDS, group_name, start_run
from imagegen.store import RunStore

PRIVATE_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}  # Ray's usage statistics off: set before import and in every actor
POLL_SECONDS = 0.2  # how long the driver waits for an actor's result before looking at the rest
IN_FLIGHT = 2  # claims sent to one actor at once: one generates while the other's images are encoded and sent
REPLACEMENTS = 2  # actors started in place of dead ones, per actor slot
START_TIMEOUT = 300.0  # seconds an actor may wait for a free GPU/CPU in the cluster before the run gives up on it


def ray_installed() -> bool:
    """Whether the `ray` extra is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def import_ray() -> Any:
    """Ray, imported with usage statistics off. Raises InputError when it is not installed."""
    os.environ.update(PRIVATE_ENV)  # Ray reads it when imported and when it starts a cluster
    if "RAY_AUTH_MODE" not in os.environ and _has_auth_token():
        # `ray start` turns token authentication on when a token exists (`ray get-auth-token
        # --generate`); a driver has to ask for it itself, before the import (Ray reads it then).
        # A cluster without authentication still lets such a driver in.
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise InputError("`--ray` needs Ray: pip install 'imagegen[ray]' (on this machine and on every node)") from None
    return ray


def connect(address: str) -> tuple[Any, bool]:
    """Ray connected to the cluster at `address` ("auto": the one RAY_ADDRESS names or the one
    running on this machine, else a new local one); returns (ray, whether this call connected).
    An already connected process (a test's `ray.init`) is used as it is. Raises InputError when
    the cluster cannot be reached."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init installs its own SIGTERM handler: keep ours
        handlers[sig] = signal.getsignal(sig)
    try:
        ray.init(address=None if address == "auto" else address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, namespace="imagegen", runtime_env={"env_vars": dict(PRIVATE_ENV)})
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"--ray {address}: cannot connect to a Ray cluster: {' '.join(str(exc).split())[:300]}") from None
    finally:
        for sig, handler in handlers.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except ValueError:  # not the main thread: Ray did not install one either
                pass
    return ray, True


def _has_auth_token() -> bool:
    """Whether Ray would find an authentication token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token)."""
    from pathlib import Path

    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


@dataclass
class ActorPlan:
    """How many actors, and what each asks of the cluster."""

    count: int
    device: str  # "cuda" (one GPU each) or "cpu"
    cpus: int  # CPUs each actor asks for (its torch threads on a CPU actor)
    gpus: int  # GPUs each actor asks for
    summary: str  # one line about the cluster and the plan


def plan_actors(resources: dict[str, float], nodes: int, device: str | None, actors: int | None) -> ActorPlan:
    """One actor per GPU of the cluster (or `actors` of them); with device cpu, `actors` CPU actors
    (default one per node) sharing the cluster's CPUs. Raises InputError when the cluster cannot
    hold them."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    about = f"{nodes} node{'s' if nodes != 1 else ''}, {gpus} GPU{'s' if gpus != 1 else ''}, {cpus} CPUs"
    if device is not None and device.startswith("cpu"):
        count = actors or nodes
        if count > cpus:
            raise InputError(f"--ray-actors {count}: the Ray cluster has {cpus} CPUs ({about})")
        each = max(1, cpus // count)
        return ActorPlan(count, "cpu", each, 0, f"{about}; {count} CPU actor{'s' if count != 1 else ''}, {each} CPUs each")
    if not gpus:
        raise InputError(f"the Ray cluster has no GPU ({about}); render on CPU actors with --device cpu --ray-actors N")
    count = actors or gpus
    if count > gpus:
        raise InputError(f"--ray-actors {count}: the Ray cluster has {gpus} GPUs ({about})")
    return ActorPlan(count, "cuda", 1, 1, f"{about}; {count} GPU actor{'s' if count != 1 else ''}, one GPU each")


@dataclass
class _Actor:
    name: str  # the worker's name in the manifest (r0, r1, ...)
    slot: int
    handle: Any
    ray_name: str
    started: float
    host: str | None = None
    pid: int | None = None
    device: str = ""
    state: str = "starting"  # starting | loading | ready | lost | refused
    inflight: int = 0
    group: str | None = None
    batch_size: int = 1
    loaded_at: float | None = None
    rendered: int = 0


@dataclass
class _Flight:
    kind: str  # hello | load | render
    actor: _Actor
    ids: list[str] = field(default_factory=list)


def render_with_ray(
    recipe: Recipe,
    store: RunStore,
    *,
    address: str = "auto",
    actors: int | None = None,
    config: ClusterConfig | None = None,
    options: RenderOptions | None = None,
    on_event: Callable[[Event], None] = lambda e: None,
    should_stop: Callable[[], str | None] = lambda: None,
    on_refresh: Callable[[], None] | None = None,
    lease: float = LEASE_SECONDS,
) -> RenderSummary:
    """Render the recipe's pending jobs on the Ray cluster at `address` (`options.device` "cpu":
    `actors` CPU actors, else one actor per GPU or `actors` of them); the same summary and events
    as `render_recipe` (an actor's events carry its name). Raises InputError when Ray is missing,
    the cluster cannot be reached or hold the actors, or when every actor refused (a file missing
    or differing from the driver's, another imagegen version); ImagegenError when every actor
    died with jobs left."""
    opts = options or RenderOptions()
    if compile_wanted(recipe, opts):  # never silently eager: actors do not compile yet
        raise InputError("`render.compile` (the recipe or the defaults file) works with a single-process render; "
                         "not with `--ray` yet: pass --no-compile to render eager on Ray actors")
    config = config or ClusterConfig()
    started = time.monotonic()

    # 1. Plan, and make the run folder agree with it; nothing to render: Ray is not even started.
    emit, run, summary = start_run(recipe, store, opts, on_event)
    if not run.pending:
        emit(run.start_event)
        summary.seconds = time.monotonic() - started
        emit({"event": "finish", **_summary_event(summary)})
        return summary

    from imagegen.render.photos import write_input_thumbs

    write_input_thumbs(store.thumbs, run.jobs)  # the sheets show each photo beside its renders

    # 2. The driver's sha256 of every file: each actor's copy must match it (input photos: their
    # sha256 is in the jobs already).
    from imagegen.render.writer import file_hashes

    with stoppable(should_stop):
        hashes = file_hashes(run.pending)

    # 3. The cluster, and the actors it can hold.
    ray, connected_here = connect(address)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        plan = plan_actors(ray.cluster_resources(), len(nodes), opts.device, actors)
        emit({**run.start_event, "workers": plan.count})
        emit({"event": "cluster", "address": address, "nodes": len(nodes), "actors": plan.count,
              "message": f"Ray cluster ({address}): {plan.summary}"})
        return _drive(ray, recipe, store, run, hashes, plan, config, opts, summary, emit, should_stop, on_refresh, lease)
    finally:
        if connected_here:
            ray.shutdown()


def _drive(ray: Any, recipe: Recipe, store: RunStore, run: Any, hashes: dict, plan: ActorPlan, config: ClusterConfig,
           opts: RenderOptions, summary: RenderSummary, emit: Callable[[Event], None],
           should_stop: Callable[[], str | None], on_refresh: Callable[[], None] | None, lease: float) -> RenderSummary:
    from ray.exceptions import RayError

    from imagegen.render.ray_actor import LoadSpec, RenderActor
    from imagegen.render.writer import ImageWriter

    started = time.monotonic()
    by_id = {j.id: j for j in run.pending}
    store.queue_jobs([(j.id, j.index, group_name(j)) for j in run.pending])
    actor_opts: dict[str, Any] = {"num_cpus": plan.cpus, "num_gpus": plan.gpus, "max_concurrency": IN_FLIGHT,
                                  "max_restarts": 0, "namespace": "imagegen",
                                  "runtime_env": {"env_vars": dict(PRIVATE_ENV)}}
    remote_actor = ray.remote(RenderActor)
    token = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
    driver_host = socket.gethostname()
    batch_size = opts.batch_size or recipe.batch_size
    load_options = RenderOptions(**{**vars(opts), "device": plan.device, "budget": None, "compile": False})
    flights: dict[Any, _Flight] = {}
    crew: list[_Actor] = []
    replacements = {slot: REPLACEMENTS for slot in range(plan.count)}
    refusals: list[str] = []  # one line each, in order; shown once an actor has loaded
    shown_refusals: set[str] = set()
    fatal: list[str] = []  # an actor's InputError while rendering (a LoRA that does not fit): the run stops
    seen: set[str] = set()
    owner: dict[str, str] = {}  # job id -> the actor whose image of it is being written
    to_render = len(run.pending)
    render_start: float | None = None
    last_image: float | None = None
    counter = iter(range(1 << 30))

    def start(slot: int) -> _Actor:
        name = f"r{next(counter)}"
        ray_name = f"imagegen-{token}-{name}"
        handle = remote_actor.options(name=ray_name, **actor_opts).remote(name)
        actor = _Actor(name, slot, handle, ray_name, time.monotonic(), device=plan.device, batch_size=batch_size)
        crew.append(actor)
        flights[handle.hello.remote()] = _Flight("hello", actor)
        return actor

    def progress() -> None:
        emit({"event": "progress", "rendered": summary.rendered, "failed": summary.failed, "to_render": to_render,
              "seconds": round(time.monotonic() - (render_start or started), 3)})

    def written(job: Any, seconds: float, path: Any) -> None:
        nonlocal last_image
        name = owner.pop(job.id, "")
        summary.rendered += 1
        last_image = time.monotonic()
        for a in crew:
            if a.name == name:
                a.rendered += 1
        emit({"event": "image", "index": job.index, "id": job.id, "seconds": round(seconds, 4), "file": str(path),
              "worker": name})

    def fail(job: Any, error: str, seconds: float | None, name: str) -> None:
        store.mark_failed(job.id, error, seconds)
        store.release([job.id], name)
        summary.failed += 1
        summary.failures.append((job.index, error))
        emit({"event": "failed", "index": job.index, "id": job.id, "error": error, "worker": name})

    writer = ImageWriter(store, written)

    def show_refusals() -> None:
        for line in refusals:
            if line not in shown_refusals:
                shown_refusals.add(line)
                emit({"event": "cluster", "message": f"an actor refused to render: {line}"})

    def drop(actor: _Actor, state: str) -> int:
        """Stop using `actor`: its claims back to the queue, its flights forgotten, the process killed."""
        actor.state = state
        for ref in [r for r, f in flights.items() if f.actor is actor]:
            del flights[ref]
        actor.inflight = 0
        given_back = store.unclaim_worker(actor.name)
        if actor.pid is not None:
            store.set_worker_state(actor.name, state)
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:  # already gone
            pass
        return given_back

    def lost(actor: _Actor, why: str) -> None:
        given_back = drop(actor, "lost")
        replace = replacements[actor.slot] > 0 and not stopping() and work_left()
        where = f" on {actor.host}" if actor.host else ""
        message = f"actor {actor.name}{where} died ({why}); its {given_back} claimed jobs go back to the queue"
        if replace:
            replacements[actor.slot] -= 1
            message += f"; starting {start(actor.slot).name} in its place"
        emit({"event": "worker_lost", "worker": actor.name, "device": actor.device, "host": actor.host,
              "requeued": given_back, "message": message})

    def refuse(actor: _Actor, line: str) -> None:
        drop(actor, "refused")
        refusals.append(line)
        emit({"event": "worker_refused", "worker": actor.name, "host": actor.host, "error": line})
        if render_start is not None:
            show_refusals()

    def stopping() -> bool:
        return stop_reason is not None or bool(fatal) or bool(writer.full_disk)

    def work_left() -> bool:
        q = store.queued()
        return bool(q["waiting"] or q["claimed"])

    def feed(actor: _Actor) -> None:
        while actor.state == "ready" and actor.inflight < IN_FLIGHT and not stopping():
            ids = store.claim(actor.name, actor.batch_size, lease=lease, prefer_group=actor.group)
            if not ids:
                return
            jobs = [by_id[i] for i in ids]
            actor.group = group_name(jobs[0])
            actor.inflight += 1
            flights[actor.handle.render.remote(jobs, actor.batch_size)] = _Flight("render", actor, ids)

    def landed(ref: Any, flight: _Flight) -> None:
        nonlocal render_start
        actor = flight.actor
        try:
            value = ray.get(ref)
        except RayError as exc:
            if getattr(exc, "actor_init_failed", False):  # the node cannot even import the actor
                refuse(actor, _init_failure(exc))
            else:
                lost(actor, _ray_reason(exc))
            return
        if flight.kind == "hello":
            actor.host, actor.pid = value["host"], value["pid"]
            if value["imagegen"] != __version__:
                refuse(actor, f"node {actor.host} runs imagegen {value['imagegen']}, the driver {__version__}; "
                              "install the same version on every node")
                return
            store.register_worker(actor.name, pid=actor.pid, device=plan.device, host=actor.host)
            actor.state = "loading"
            spec = LoadSpec(recipe, run.pending, load_options, hashes, config.mapping_for(actor.host, driver_host),
                            plan.cpus if plan.device == "cpu" else None)
            flights[actor.handle.load.remote(spec)] = _Flight("load", actor)
        elif flight.kind == "load":
            for event in value.get("events", ()):
                if event.get("event") == "device_wait":
                    emit({**event, "worker": actor.name})
            if not value["ok"]:
                refuse(actor, value["error"])
                return
            actor.state, actor.loaded_at, actor.device = "ready", time.monotonic(), value["device"]
            store.set_worker_state(actor.name, "rendering")
            info = {"worker": actor.name, "actor": actor.ray_name, "host": actor.host, "pid": actor.pid,
                    "model": value["model"], "family": value["family"], "device": value["device"],
                    "dtype": value["dtype"], "batch_size": actor.batch_size}
            if render_start is None:
                render_start = time.monotonic()
                emit({"event": "loaded", **info, "workers": plan.count, "seconds": round(time.monotonic() - started, 2)})
                show_refusals()
            else:
                emit({"event": "worker_loaded", **info, "seconds": value["seconds"]})
        else:
            actor.inflight -= 1
            if "error" in value:
                if value["input"]:
                    fatal.append(value["error"])
                    drop(actor, "failed")
                else:
                    lost(actor, value["error"])
                return
            actor.batch_size = value["batch_size"]
            for event in value["events"]:
                emit({**event, "worker": actor.name})
            for r in value["results"]:
                if r["id"] in seen:
                    continue
                seen.add(r["id"])
                owner[r["id"]] = actor.name
                writer.submit_encoded(by_id[r["id"]], r["encoded"], r["seconds"], r["joules"])
            # The images are the driver's now: out of the queue, so that an actor lost before they
            # are written does not hand them to another one.
            store.release([r["id"] for r in value["results"]], actor.name)
            for f in value["failed"]:
                if f["id"] not in seen:
                    seen.add(f["id"])
                    fail(by_id[f["id"]], f["error"], f["seconds"], actor.name)
            if value["failed"]:
                progress()

    def harvest(block: bool) -> None:
        before = summary.rendered
        writer.harvest(block, backlog=4 * IN_FLIGHT * batch_size * max(1, len(crew)))
        if summary.rendered != before:
            progress()

    stop_reason: str | None = None
    last_renew = last_refresh = time.monotonic()
    try:
        for slot in range(plan.count):
            start(slot)
        while True:
            if stop_reason is None:
                stop_reason = should_stop()
            for actor in crew:
                feed(actor)
            rendering = sum(1 for f in flights.values() if f.kind == "render")
            if not rendering and (stopping() or not work_left()):
                break
            if not flights:
                break  # no actor left to render or to start
            waiting = [a for a in crew if a.state == "starting"]
            if not rendering and waiting and not any(a.state in ("loading", "ready") for a in crew) and \
                    all(time.monotonic() - a.started > START_TIMEOUT for a in waiting):
                for a in waiting:
                    refuse(a, f"actor {a.name} found no free {'GPU' if plan.gpus else 'CPU'} in the Ray cluster "
                              f"within {START_TIMEOUT:.0f}s")
                break
            ready, _ = ray.wait(list(flights), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                flight = flights.pop(ref, None)
                if flight is not None:
                    landed(ref, flight)
            harvest(block=False)
            if time.monotonic() - last_renew > lease / 4:
                last_renew = time.monotonic()
                for a in crew:
                    if a.state == "ready":
                        store.renew(a.name, lease=lease, rendered=a.rendered, seconds=time.monotonic() - (a.loaded_at or 0))
            if on_refresh and time.monotonic() - last_refresh > opts.refresh_every:
                harvest(block=True)
                on_refresh()
                last_refresh = time.monotonic()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; written images are kept
        summary.interrupted, summary.aborted = "SIGINT", True
        raise
    finally:
        for a in crew:
            if a.state not in ("lost", "refused", "failed"):
                drop(a, "stopped")
        try:
            harvest(block=True)
        finally:
            writer.close()
            summary.left += writer.left
            for a in crew:
                if a.pid is not None and a.loaded_at is not None:
                    store.renew(a.name, lease=lease, rendered=a.rendered, seconds=(last_image or time.monotonic()) - a.loaded_at)
            left = store.queued()
            store.clear_queue()
            summary.left += left["waiting"] + left["claimed"]
            summary.seconds = (last_image or time.monotonic()) - (render_start or started)
            summary.batch_size = batch_size
            if summary.aborted:
                emit({"event": "finish", **_summary_event(summary)})
    summary.interrupted = stop_reason
    emit({"event": "finish", **_summary_event(summary), "workers": len(crew),
          "lost": [a.name for a in crew if a.state == "lost"]})
    if writer.full_disk:
        raise disk_full(store.folder, f"{summary.rendered} images finished and kept, {summary.left} left")
    if fatal:
        raise InputError(fatal[0])
    if summary.left and not stop_reason:
        if render_start is None and refusals:
            raise InputError(refusals[0])
        raise ImagegenError(f"every Ray actor stopped with {summary.left} jobs left "
                            f"({', '.join(f'{a.name} {a.state}' for a in crew)}); render the recipe again to resume")
    return summary


def _init_failure(exc: BaseException) -> str:
    """One line for an actor that could not start on its node (imagegen or a library missing there)."""
    import re

    text = str(exc)
    ip = re.search(r"\bip=([0-9a-fA-F.:]+)", text)
    errors = [line.strip() for line in text.splitlines() if re.match(r"\s*\w+(Error|Exception): ", line)]
    cause = errors[-1] if errors else " ".join(text.split())[:200]
    where = f"node {ip.group(1)}" if ip else "a node"
    return (f"{where}: the imagegen actor cannot start ({cause}); install imagegen {__version__} with the same "
            "libraries as the driver on every node")


def _ray_reason(exc: BaseException) -> str:
    """Why a Ray call failed, in a few words ("its node has died", "killed with ray.kill", ...)."""
    import re

    text = " ".join(str(exc).split())
    because = re.search(r"died because ([^.]*)", text)
    if because:
        return because.group(1)
    if "ray.kill" in text:
        return "killed with ray.kill"
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name
