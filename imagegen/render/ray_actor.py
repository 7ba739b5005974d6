"""The Ray actor of a several-machine render: one per GPU of the cluster (or N CPU actors).

    driver ── hello ──▶ actor: its node, host, pid and imagegen version (another version is refused)
           ── load ───▶ actor: map the driver's paths to this node's, check each file's sha256
                        against the driver's, take the GPU's lock, load the model once
           ── render ─▶ actor: engine batches of one claim (its LoRA set switched only when the
                        group changes); PNG + thumbnail bytes and metadata back per job
           ◀────────── the driver writes them (`ImageWriter.submit_encoded`) and records them

A plain class: the driver wraps it with `ray.remote(...)`, so importing this module needs
neither Ray nor torch. Generation holds a lock and encoding runs outside it, so with two calls
in flight (the driver starts the actor with max_concurrency=2) one claim's images are encoded
while the next claim generates. Nothing is printed and no file is written here; what goes wrong
comes back as a value (`{"error": ...}`), never as a traceback through Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from imagegen import __version__
from imagegen.clusterconfig import map_path
from imagegen.errors import ImagegenError, InputError
from imagegen.plan import Job
from imagegen.recipe import Recipe
from imagegen.render.run import RenderOptions

Event = dict[str, Any]


@dataclass
class LoadSpec:
    """What an actor needs to load (pickled to it by Ray)."""

    recipe: Recipe
    jobs: list[Job]  # the run's pending jobs: their LoRAs are checked against the model family
    options: RenderOptions  # device "cuda" (Ray gives the actor its GPU) or "cpu"
    hashes: dict[str, str | None]  # the driver's `file_hashes`: path -> sha256 (None: not a file there)
    mapping: dict[str, str]  # this node's path mapping (`ClusterConfig.mapping_for` its host)
    threads: int | None = None  # torch CPU threads of a CPU actor (its share of the node's cores)


def input_hashes(jobs: list[Job]) -> dict[str, str | None]:
    """The input photos, masks and control images of `jobs` with the sha256 their plan recorded."""
    from imagegen.inputs import ALPHA

    out: dict[str, str | None] = {}
    for job in jobs:
        ji = job.input
        if ji is not None:
            out[ji.photo] = ji.photo_sha256
            if ji.mask is not None and ji.mask != ALPHA:
                out[ji.mask] = ji.mask_sha256
        for c in job.controlnet:
            if c.image:
                out[c.image] = c.image_sha256
    return out


def check_files(hashes: dict[str, str | None], local: Callable[[str], str], host: str) -> None:
    """Every file the driver hashed (models, LoRAs, ... and the jobs' input images) is on this
    node with the driver's sha256 (cached per file by size and mtime, `metadata.sha256_file`).
    Raises InputError naming the node and the file."""
    from imagegen.metadata import sha256_file
    from imagegen.render.writer import ADDNET

    for path, want in hashes.items():
        if want is None or path.startswith(ADDNET):
            continue
        mine = local(path)
        where = mine if mine == path else f"{mine} (the driver's {path})"
        if not Path(mine).exists():
            raise InputError(f"node {host}: {where} is missing; place the driver's file there (the same path, or a "
                             "`models:` mapping in --ray-config)")
        got = sha256_file(mine)
        if got != want:
            raise InputError(f"node {host}: {where}: sha256 {got[:12]}... differs from the driver's {want[:12]}...; "
                             "copy the driver's file to this node")


class NodeEngine:
    """An engine whose callers name files by the driver's paths: LoRA sets, a hires pass's
    upscaler file and ControlNet models are read from this node's paths; `model_name` is the
    driver's (the infotext of an image does not depend on where the node keeps the checkpoint)."""

    def __init__(self, engine: Any, local: Callable[[str], str], checkpoint: str) -> None:
        self._engine = engine
        self._local = local
        self.model_name = engine.model_name
        if local(checkpoint) != checkpoint:  # the rule of engine/loading.py, on the driver's name
            self.model_name = Path(checkpoint).name if Path(local(checkpoint)).is_dir() else Path(checkpoint).stem

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def set_loras(self, loras: Any) -> None:
        self._engine.set_loras([(self._local(path), weight) for path, weight in loras])

    def generate(self, requests: Any) -> Any:
        local, replace = self._local, dataclasses.replace

        def mapped(r: Any) -> Any:
            if r.hires is not None:
                r = replace(r, hires=replace(r.hires, upscaler=local(r.hires.upscaler)))
            if r.controlnet:
                r = replace(r, controlnet=tuple(replace(c, model=local(c.model)) for c in r.controlnet))
            return r

        return self._engine.generate([mapped(r) for r in requests])


class NodePhotos:
    """The render's `PhotoCache`, reading each job's photo, mask and control images from this
    node's paths (their sha256 is checked as on the driver)."""

    def __init__(self, local: Callable[[str], str]) -> None:
        from imagegen.render.photos import PhotoCache

        self._cache = PhotoCache()
        self._local = local

    def _mapped(self, job: Job) -> Any:
        from imagegen.inputs import ALPHA
        from imagegen.render.photos import PhotoJob

        local, replace, ji = self._local, dataclasses.replace, job.input
        if ji is not None:
            ji = replace(ji, photo=local(ji.photo), mask=local(ji.mask) if ji.mask not in (None, ALPHA) else ji.mask)
        units = tuple(replace(c, image=local(c.image)) if c.image else c for c in job.controlnet)
        return PhotoJob(ji, units, job.width, job.height, job.hires)

    def init_request(self, job: Job) -> Any:
        return self._cache.init_request(self._mapped(job))

    def control_requests(self, job: Job) -> tuple:
        return self._cache.control_requests(self._mapped(job))


class RenderActor:
    """One renderer on one node: `hello`, `load` once, then `render` claims until killed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.host = socket.gethostname()
        self.engine: Any = None
        self._generating = threading.Lock()  # one claim at a time on the device
        self._hold = contextlib.ExitStack()  # the device lock, for the actor's life
        self._key: Any = None  # the group key whose LoRA set is fused now
        self._scheduler_configs: dict[str, dict] = {}

    def hello(self) -> dict:
        """Where this actor runs: host, Ray node id, pid, imagegen version, its GPU ids."""
        import ray

        ctx = ray.get_runtime_context()
        return {"host": self.host, "node": ctx.get_node_id(), "pid": os.getpid(), "imagegen": __version__,
                "gpus": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}

    def load(self, spec: LoadSpec) -> dict:
        """Check the files and load the model; {"ok": True, model, family, device, dtype, seconds,
        events} or {"ok": False, "error": one line, "input": whether it is the user's to fix}."""
        from imagegen.render.run import _load

        started = time.monotonic()
        events: list[Event] = []
        try:
            mapping = spec.mapping

            def local(path: str) -> str:
                return map_path(path, mapping)

            if spec.threads:
                import torch

                torch.set_num_threads(spec.threads)
            check_files({**spec.hashes, **input_hashes(spec.jobs)}, local, self.host)
            engine, _ = _load(spec.recipe, spec.jobs, spec.options, events.append, None, self._hold, local=local,
                              hashes=spec.hashes)
            self.engine = NodeEngine(engine, local, spec.recipe.checkpoint) if mapping else engine
            from imagegen.render.photos import PhotoCache

            self.photos = NodePhotos(local) if mapping else PhotoCache()
            self.recipe, self.hashes = spec.recipe, spec.hashes
            from imagegen.energy import meter_for

            self.meter = meter_for(engine.device)
        except ImagegenError as exc:
            self._hold.close()
            return {"ok": False, "error": exc.message, "input": isinstance(exc, InputError), "events": events}
        except Exception as exc:  # a bug or a broken install on this node: said in one line, not a traceback
            self._hold.close()
            return {"ok": False, "error": f"node {self.host}: loading failed: {type(exc).__name__}: {_one_line(exc)}",
                    "input": False, "events": events}
        e = self.engine
        return {"ok": True, "model": e.model_name, "family": e.family, "device": e.device, "dtype": e.dtype,
                "seconds": round(time.monotonic() - started, 2), "events": events}

    def render(self, jobs: list[Job], batch_size: int) -> dict:
        """Render one claim (jobs of one group); {"results": [{id, encoded, seconds, joules}],
        "failed": [{id, error, seconds}], "events": [...], "batch_size": after any out-of-memory
        halving}; or {"error": one line, "input": bool} when the actor cannot go on (a device
        error, a LoRA that does not fit)."""
        from imagegen.render.batching import Batches
        from imagegen.render.run import _render_batch, _switch_loras
        from imagegen.render.writer import encode_job

        made: list[tuple] = []
        failed: list[tuple[Job, str, float | None]] = []
        events: list[Event] = []
        sink = _Collect(made)
        started = time.monotonic()
        try:
            with self._generating:
                batches = Batches(jobs, batch_size)
                while batches:
                    batch = batches.next()
                    if batch[0].group_key != self._key:
                        self._key = None
                        held: list[tuple] = []
                        if not _switch_loras(self.engine, batch, held):
                            failed.extend(held)
                            continue
                        self._key = batch[0].group_key
                    _render_batch(batch, self.recipe, self.engine, self.hashes, batches, sink,
                                  lambda job, error, seconds: failed.append((job, error, seconds)), events.append,
                                  self._scheduler_configs, self.meter, lambda *measurement: None, self.photos)
                batch_size = batches.batch_size
            generated = time.monotonic() - started
            results = [{"id": job.id, "encoded": encode_job(image, params, prov, first), "seconds": seconds,
                        "joules": joules} for job, image, params, prov, seconds, first, joules in made]
        except ImagegenError as exc:
            return {"error": f"node {self.host}: {exc.message}", "input": isinstance(exc, InputError)}
        except Exception as exc:
            return {"error": f"node {self.host}: {type(exc).__name__}: {_one_line(exc)}", "input": False}
        return {"results": results, "failed": [{"id": j.id, "error": e, "seconds": s} for j, e, s in failed],
                "events": events, "batch_size": batch_size, "seconds": round(generated, 4)}


class _Collect:
    """Takes `ImageWriter.submit`'s place inside an actor: keeps the images for encoding."""

    def __init__(self, made: list[tuple]) -> None:
        self.made = made

    def submit(self, job: Job, image: Any, parameters: str, provenance: dict, seconds: float,
               first: tuple[Any, str] | None = None, joules: float | None = None) -> None:
        self.made.append((job, image, parameters, provenance, seconds, first, joules))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]
