"""`imagegen render`, `imagegen status`, `imagegen reproduce`."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer

from imagegen.cli.app import app, err, examples, silence_closed_streams
from imagegen.errors import ImagegenError, InputError, RunLockedError
from imagegen.units import fmt_eta

EXIT_FAILED_JOBS = 1
EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}
PLAIN_EVERY = 5.0  # seconds between plain progress lines without a terminal


# What a start event reports about the run folder, when the count is not zero.
START_NOTES = (
    ("adopted", "{} finished images adopted after a crash"),
    ("temp_removed", "{} half-written files removed"),
    ("reset_missing", "{} missing images queued again"),
    ("orphaned", "{} jobs no longer in the recipe, their images kept (see `imagegen status`)"),
    ("renamed", "{} kept images renamed to their new index"),
    ("picks_moved", "picks.txt follows {} picked jobs to their new index"),
)


class Reporter:
    """Turns render events into what a person sees: a rich progress bar on a terminal, plain
    timestamped lines at most every few seconds otherwise, or JSON lines with --json."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # "bar" | "plain" | "json"
        self.progress = None
        self.task = None
        self.total = 0
        self.done = 0
        self.failed = 0
        self.t0 = time.monotonic()
        self.last_line = 0.0
        self.oom_said = False
        self.reader_gone = False  # stderr/stdout closed (a pipe whose reader left): keep rendering, say nothing

    @staticmethod
    def choose(as_json: bool) -> "Reporter":
        if as_json:
            return Reporter("json")
        return Reporter("bar" if sys.stderr.isatty() else "plain")

    def line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self.progress is not None:
            self.progress.console.print(f"{stamp} {text}", highlight=False, markup=False)
        else:
            err(f"{stamp} {text}")

    def __call__(self, event: dict) -> None:
        """Show one event. A reader that went away (closed pipe) must not stop an overnight render:
        from then on nothing is shown; log.jsonl still records every event."""
        if self.reader_gone:
            return
        try:
            self._show(event)
        except (BrokenPipeError, ValueError, OSError) as exc:
            if isinstance(exc, ValueError) and "closed file" not in str(exc):
                raise
            self.reader_gone = True
            self.progress = None
            silence_closed_streams()

    def _show(self, event: dict) -> None:
        kind = event["event"]
        if self.mode == "json":
            typer.echo(json.dumps(event, ensure_ascii=False, default=str))
            sys.stdout.flush()
            return
        if kind == "start":
            self.total = event["to_render"]
            extra = [text.format(event[key]) for key, text in START_NOTES if event[key]]
            if event["picks_orphaned"]:
                extra.append(f"picks of jobs no longer in the recipe kept as comments in picks.txt: {', '.join(event['picks_orphaned'])}")
            if event["untracked"]:
                shown = ", ".join(event["untracked"][:3]) + (" ..." if len(event["untracked"]) > 3 else "")
                extra.append(f"{len(event['untracked'])} files in images/ are not this run's and were left alone ({shown})")
            self.line(f"{event['recipe']}: {event['planned']} jobs, {event['done']} done, {self.total} to render"
                      + (f"; {'; '.join(extra)}" if extra else ""))
        elif kind == "loaded":
            workers = f" ({event['workers']} workers; first loaded)" if event.get("workers") else ""
            self.line(f"model {event['model']} ({event['family']}) on {event['device']} {event['dtype']}, "
                      f"batch {event['batch_size']}, loaded in {event['seconds']:.1f}s{workers}")
            self.t0 = time.monotonic()
            if self.mode == "bar" and self.total:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.progress = Progress(TextColumn("[bold]render"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                         console=__import__("rich.console").console.Console(stderr=True), transient=False)
                self.progress.start()
                self.task = self.progress.add_task("render", total=self.total, rate="")
        elif kind == "failed":
            self.line(f"job {event['index']} failed: {event['error']}")
        elif kind == "progress":
            # Sent after each step that finished images, with the run's totals so far: the count
            # and the rate follow finished images, so the ETA settles after the first batch.
            self.done, self.failed = event["rendered"], event["failed"]
            finished = self.done + self.failed
            rate = finished / event["seconds"] if event["seconds"] > 0 else 0.0
            if self.progress is not None:
                self.progress.update(self.task, completed=finished, rate=f"{rate:.2f} img/s")
            elif self.mode == "plain" and (time.monotonic() - self.last_line >= PLAIN_EVERY or finished >= self.total):
                self.last_line = time.monotonic()
                left = self.total - finished
                self.line(f"{finished}/{self.total} ({self.failed} failed), {rate:.2f} img/s, "
                          f"ETA {fmt_eta(left / rate if rate else None)}")
        elif kind in ("device_wait", "worker_lost", "cluster"):
            self.line(event["message"])
        elif kind == "worker_exit" and event.get("error"):
            self.line(f"worker {event['worker']} stopped: {event['error']}")
        elif kind == "oom":
            if not self.oom_said:  # said once; further halvings are in log.jsonl and the summary
                self.oom_said = True
                self.line(event["message"] + " (further halvings are logged quietly)")
        elif kind == "finish":
            self.stop()
            if event.get("aborted"):
                state = "aborted by a second Ctrl-C (the batch being generated was dropped; written images are kept)"
            elif event.get("budget_reached"):
                state = f"stopped, {event['budget_reached']}"
            else:
                state = f"interrupted by {event['interrupted']}" if event["interrupted"] else "finished"
            batch = f"; batch size ended at {event['batch_size']} after CUDA out of memory" if self.oom_said else ""
            self.line(f"{event['recipe']}: {state}: {event['rendered']} rendered, {event['failed']} failed, {event['left']} left, "
                      f"{event['already_done']} were already done; {event['images_per_second']:.2f} img/s; "
                      f"{energy_text(event.get('wh_per_image'), event.get('kwh'))}{batch}; {event['folder']}")

    def stop(self) -> None:
        if self.progress is not None:
            progress, self.progress = self.progress, None
            try:
                progress.stop()
            except (OSError, ValueError):
                self.reader_gone = True



def energy_text(wh_per_image: float | None, kwh: float | None) -> str:
    """"0.52 Wh/image, 0.104 kWh" or "energy not measured" (never a guess)."""
    if kwh is None:
        return "energy not measured"
    per = f"{wh_per_image:.3g} Wh/image, " if wh_per_image is not None else ""
    return f"{per}{kwh:.4g} kWh"


class StopFlag:
    """SIGINT/SIGTERM ask the render to stop after the current batch; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = name
        err(f"imagegen: {name}: finishing the images already generated, then stopping (Ctrl-C again to abort now)")

    def __call__(self) -> str | None:
        return self.reason

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _dry_run(recipe: Any, output: Path, limit: int | None, retry_failed: bool) -> None:
    from imagegen.plan import plan
    from imagegen.sheets import varying_axes
    from imagegen.store import preview_pending

    jobs = plan(recipe)
    by_id = {j.id: j for j in jobs}
    preview = preview_pending(output, list(by_id), retry_failed=retry_failed)
    todo = [by_id[i] for i in preview.todo]
    if limit is not None:
        todo = todo[:limit]
    failed_note = f"{len(preview.failed)} failed (use --retry-failed), " if preview.failed else ""
    typer.echo(f"{recipe.name}: {len(jobs)} jobs, {len(preview.done)} done, "
               f"{failed_note}would render {len(todo)} into {output}")
    # Every axis that varies in the plan (guidance, LoRA weights, ... as well as seed and size),
    # so no two listed jobs look alike; the prompt is shown whole enough to tell variants apart.
    varying = [key for key in varying_axes(jobs) if key != "prompt"]
    for j in todo[:20]:
        axes = dict(j.axes)
        shown = " ".join(f"{key}={axes[key]}" for key in varying) or f"seed={j.seed}"
        typer.echo(f"  {j.index:>5} {j.id} {shown} :: {j.prompt[:120]}")
    if len(todo) > 20:
        typer.echo(f"  ... and {len(todo) - 20} more")


@app.command(epilog=examples(
    "imagegen render recipes/example.yaml",
    "imagegen render recipes/a.yaml recipes/b.yaml --wait        (a queue, e.g. from cron)",
    "imagegen render recipes/example.yaml --dry-run --limit 10",
    "imagegen render recipes/example.yaml --device cuda:1 --batch-size 4 --retry-failed"))
def render(
    recipes: List[Path] = typer.Argument(..., metavar="RECIPE", help="Recipes to render, one after another.", show_default=False),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu ... (default: cuda if available, else cpu)."),
    dtype: Optional[str] = typer.Option(None, help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Override the recipe's batch_size."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Render at most N pending jobs (per recipe)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be rendered; touch nothing."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Render failed jobs again."),
    wait: bool = typer.Option(False, "--wait", help="Wait for another render holding the run folder or the GPU instead of stopping."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop the queue at the first recipe that fails to validate."),
    as_json: bool = typer.Option(False, "--json", help="One JSON event per line on stdout."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: the recipe's `output`)."),
    no_sheet: bool = typer.Option(False, "--no-sheet", help="Do not write contact sheets at the end."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow hub ids (network access)."),
    verify: bool = typer.Option(False, "--verify", help="Before rendering, compare every finished image with its recorded sha256 and render damaged ones again."),
    adopt: bool = typer.Option(False, "--adopt", help="Render into a run folder that belongs to another recipe name, making it this recipe's (its jobs become orphans, its picks comments)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Render with N worker processes on --device (e.g. --workers 2 --device cpu)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="One worker process per GPU: `all` or indices such as 0,2."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="auto|HOST:PORT",
                                      help="Render on a Ray cluster (the `ray` extra): one actor per GPU of the cluster; "
                                      "`auto` joins the cluster on this machine or starts a local one."),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", min=1, metavar="N",
                                             help="With --ray: N actors (CPU actors with --device cpu; default one per GPU, "
                                             "or one per node on CPU)."),
    ray_config: Optional[Path] = typer.Option(None, "--ray-config", metavar="FILE",
                                              help="With --ray: where each node keeps the model files (`models:` path "
                                              "mappings; see the README)."),
    until: Optional[str] = typer.Option(None, "--until", metavar="HH:MM",
                                        help="Stop before a batch would end after this time of day (local)."),
    max_hours: Optional[float] = typer.Option(None, "--max-hours", metavar="H", help="Stop before a batch would pass H hours."),
    max_kwh: Optional[float] = typer.Option(None, "--max-kwh", metavar="E",
                                            help="Stop before a batch would pass E kWh (measured; needs an energy counter)."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="torch.compile the UNet and VAE decoder (faster on GPUs after a one-off "
                                                 "compile per batch shape). Default: `render.compile` of the recipe, "
                                                 "else of the defaults file, else off."),
) -> None:
    """Render recipes into their run folders; resumable, one GPU run per folder at a time."""
    from imagegen.recipe import load_recipe
    from imagegen.render import RenderOptions
    from imagegen.render.budget import Budget

    budget = Budget.from_options(until=until, max_hours=max_hours, max_kwh=max_kwh)

    if output is not None and len(recipes) > 1:
        raise InputError("`--output` takes one recipe; each recipe has its own `output:`")
    devices = None
    cluster = None
    if ray is not None or ray_actors is not None or ray_config is not None:
        cluster = _ray_settings(ray, ray_actors, ray_config, device=device, dtype=dtype, workers=workers, gpus=gpus)
    elif workers is not None or gpus is not None:
        from imagegen.render.workers import worker_devices

        devices = worker_devices(workers=workers, gpus=gpus, device=device)
    if cluster is None:
        _check_device_dtype(device if devices is None else devices[0], dtype)
    several = "`--ray`" if cluster is not None else "`--workers`/`--gpus`" if devices is not None else None
    if several and (until or max_hours is not None or max_kwh is not None or compile_):
        raise InputError("`--until`, `--max-hours`, `--max-kwh` and `--compile` work with a single-process render; "
                         f"they are not supported with {several} yet")
    if max_kwh is not None:
        _check_energy_measured(device)
    resume_cmd = "imagegen " + shlex.join(["render", *map(str, recipes), *_resume_options(
        device=device, dtype=dtype, batch_size=batch_size, retry_failed=retry_failed, wait=wait, fail_fast=fail_fast,
        as_json=as_json, output=output, no_sheet=no_sheet, allow_download=allow_download, adopt=adopt, verify=verify, workers=workers, gpus=gpus, ray=ray, ray_actors=ray_actors,
        ray_config=ray_config, until=until, max_hours=max_hours,
        max_kwh=max_kwh, compile=compile_ is True, no_compile=compile_ is False)])
    invalid = 0
    failed_jobs = 0
    with StopFlag() as stop, _aborted_says_how_to_resume(resume_cmd):
        for path in recipes:
            try:
                recipe = load_recipe(path, allow_download=allow_download)
                folder = output or recipe.output
                if dry_run:
                    _dry_run(recipe, folder, limit, retry_failed)
                    continue
                summary = _render_one(recipe, folder, stop, as_json=as_json, wait=wait, no_sheet=no_sheet, adopt=adopt, devices=devices,
                                      cluster=cluster,
                                      options=RenderOptions(device=device, dtype=dtype, limit=limit, retry_failed=retry_failed,
                                                            batch_size=batch_size, allow_download=allow_download,
                                                            wait_device=wait, budget=budget, compile=compile_, verify=verify))
            except (InputError, RunLockedError) as exc:
                # One bad recipe, model or busy folder does not stop the overnight queue.
                if len(recipes) == 1:
                    err(exc.message)  # nothing else to do: the one clear line
                else:  # a queue (cron): when and what was skipped, among the other log lines
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                    err(f"{stamp} {exc.message}")
                    err(f"{stamp} imagegen: skipped {path}" + ("; --fail-fast stops the queue here" if fail_fast
                                                             else "; the queue goes on"))
                invalid += 1
                if fail_fast:
                    raise typer.Exit(2)
                continue
            failed_jobs += summary.failed
            budget = budget.after(summary.joules)
            if summary.budget_reached:
                err(f"{time.strftime('%Y-%m-%d %H:%M:%S')} imagegen: {summary.budget_reached}; {summary.left} jobs left; "
                    f"to resume: {resume_cmd}")
                return
            if summary.interrupted:
                err(f"imagegen: stopped by {summary.interrupted}; to resume: {resume_cmd}")
                raise typer.Exit(EXIT_INTERRUPTED.get(summary.interrupted, 130))
    if invalid:
        raise typer.Exit(2)
    if failed_jobs:
        err(f"imagegen: {failed_jobs} jobs failed; `imagegen status` shows them, `--retry-failed` renders them again")
        raise typer.Exit(EXIT_FAILED_JOBS)


@contextlib.contextmanager
def _aborted_says_how_to_resume(resume_cmd: str) -> Iterator[None]:
    """A second Ctrl-C raises KeyboardInterrupt: say so, with the resume command, and exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        err(f"{time.strftime('%Y-%m-%d %H:%M:%S')} imagegen: aborted by a second Ctrl-C; finished images are kept; "
            f"to resume: {resume_cmd}")
        raise typer.Exit(EXIT_INTERRUPTED["SIGINT"]) from None


def _render_one(recipe: Any, folder: Path, stop: "StopFlag", *, as_json: bool, wait: bool, no_sheet: bool, options: Any,
                adopt: bool = False, devices: list[str] | None = None, cluster: dict | None = None) -> Any:
    """Render one recipe into its locked run folder (with `devices`: one worker process each; with
    `cluster`: on Ray actors), then refresh its contact sheets."""
    from imagegen.render import render_recipe

    if cluster is not None:
        import functools

        from imagegen.render.ray_driver import render_with_ray

        render_recipe = functools.partial(render_with_ray, **cluster)
    elif devices is not None:
        import functools

        from imagegen.render.workers import render_with_workers

        render_recipe = functools.partial(render_with_workers, devices=devices)
    from imagegen.store import RunStore

    reporter = Reporter.choose(as_json)
    store = RunStore.open(folder, wait=wait, recipe_name=recipe.name, adopt=adopt)
    try:
        refresh = None if no_sheet else (lambda: _sheets_quietly(store))
        summary = render_recipe(recipe, store, on_event=reporter, should_stop=stop, on_refresh=refresh, options=options)
        if not no_sheet:
            _sheets_quietly(store)  # always: a recipe edit renames and orphans images even when nothing renders
        return summary
    finally:
        reporter.stop()
        store.close()


def _resume_options(**opts: Any) -> list[str]:
    """The render options as typed again (no --limit / --dry-run: resuming means finishing)."""
    out: list[str] = []
    for name, value in opts.items():
        flag = "--" + {"as_json": "json"}.get(name, name).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (None, False):
            out += [flag, str(value)]
    return out


def _ray_settings(address: str | None, actors: int | None, config: Path | None, *, device: str | None, dtype: str | None,
                  workers: int | None, gpus: str | None) -> dict:
    """`render_with_ray`'s arguments from the --ray options, checked before any run folder is
    touched and without importing Ray or torch. Raises InputError for a combination that does
    not work (yet), a bad cluster config, or a missing `ray` extra."""
    if address is None:
        raise InputError("`--ray-actors` and `--ray-config` go with `--ray auto|HOST:PORT`")
    if workers is not None or gpus is not None:
        raise InputError("`--ray` and `--workers`/`--gpus`: give one (`--ray` starts one actor per GPU of the cluster)")
    if not address.strip():
        raise InputError("`--ray` takes `auto` or the head node's HOST:PORT (e.g. 192.168.1.10:6379)")
    kind = (device or "cuda").strip().lower()
    if kind not in ("cpu", "cuda"):
        raise InputError(f"`--device {device}` with `--ray`: use --device cuda (the default: Ray gives each actor its "
                         "GPU) or --device cpu (CPU actors)")
    from imagegen.devices import resolve_dtype

    resolve_dtype(dtype, kind)
    from imagegen.render.ray_driver import ray_installed

    if not ray_installed():
        raise InputError("`--ray` needs Ray: pip install 'imagegen[ray]' (on this machine and on every node)")
    from imagegen.clusterconfig import load_cluster_config

    return {"address": address.strip(), "actors": actors, "config": load_cluster_config(config) if config else None}


def _check_device_dtype(device: str | None, dtype: str | None) -> None:
    """Bad --device/--dtype values fail before any run folder is touched (the engine's own checks)."""
    if device is None and dtype is None:
        return
    from imagegen.devices import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))


def _check_energy_measured(device: str | None) -> None:
    """--max-kwh needs a real energy counter on the device that will render (never a guess)."""
    from imagegen.devices import resolve_device
    from imagegen.energy import meter_for

    dev = resolve_device(device)
    if not meter_for(dev).measured:
        raise InputError(f"`--max-kwh`: the energy of {dev} is not measured here (no NVML energy counter or readable "
                         "RAPL); use --max-hours or --until")


def _sheets_quietly(store: Any) -> None:
    """Refresh the contact sheets of a run; a sheet problem never fails a render."""
    try:
        from imagegen.sheets import write_run_sheets

        write_run_sheets(store)
    except ImportError:
        return
    except (ImagegenError, OSError) as exc:
        err(f"imagegen: contact sheets not refreshed: {exc}")


@app.command(epilog=examples("imagegen status runs/example", "imagegen status runs/* --json"))
def status(
    runs: List[Path] = typer.Argument(..., metavar="RUN", help="Run folders.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    verify: bool = typer.Option(False, "--verify", help="Read every image and compare it with its recorded sha256; exit 1 if any is damaged."),
) -> None:
    """Where a run stands: done, pending, failed, orphaned, rate, last error, time left."""
    from imagegen.api import status as run_status

    reports = [run_status(run, verify=verify) for run in runs]
    damaged = sum(len(s.get("damaged", ())) for s in reports)
    if as_json:
        typer.echo(json.dumps(reports if len(reports) > 1 else reports[0], indent=1, default=str))
        if damaged:
            raise typer.Exit(1)
        return
    for s in reports:
        rate = f"{s['rate']:.2f} img/s" if s["rate"] else "n/a"
        typer.echo(f"{s['folder']} ({s['recipe']}): {s['done']}/{s['total']} done, {s['pending']} pending, {s['failed']} failed, "
                   f"{s['orphaned']} orphaned; rate {rate}; time left {fmt_eta(s['eta_seconds'])}; "
                   f"{energy_text(s['energy']['wh_per_image'], s['energy']['kwh'])}")
        if s["last_error"]:
            e = s["last_error"]
            typer.echo(f"  last error: job {e['index']} ({e['id']}): {e['error']}")
        for w in s.get("workers", ()):
            wrate = f"{w['rate']:.2f} img/s" if w["rate"] else "n/a"
            typer.echo(f"  worker {w['name']} ({w['device']} on {w['host']}, pid {w['pid']}): {w['state']}, {w['rendered']} rendered, "
                       f"{wrate}")
        for o in s["orphans"][:10]:
            typer.echo(f"  orphaned (no longer in the recipe, kept): {o['id']} {o['file'] or '(no image)'}")
        if len(s["orphans"]) > 10:
            typer.echo(f"  ... and {len(s['orphans']) - 10} more orphaned")
        for d in s.get("damaged", ()):
            typer.echo(f"  damaged: job {d['index']} ({d['id']}) {d['file'] or ''}: {d['problem']}")
        if verify:
            n = len(s.get("damaged", ()))
            typer.echo(f"  verify: {s['done'] - n}/{s['done']} done images match their sha256"
                       + (f"; {n} damaged: `imagegen render --verify` on the recipe renders them again" if n else ""))
    if damaged:
        raise typer.Exit(1)


@app.command(epilog=examples("imagegen reproduce runs/example/images/0001-3847c5df9d1e.png",
                             "imagegen reproduce IMAGE.png --out again.png --tolerance 0"))
def reproduce(
    image: Path = typer.Argument(..., metavar="IMAGE", help="A PNG rendered by imagegen.", show_default=False),
    device: Optional[str] = typer.Option(None, help="Device (default: as for render)."),
    dtype: Optional[str] = typer.Option(None, help="dtype (default: as for render)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also save the new render here."),
    tolerance: int = typer.Option(1, help="Largest per-channel difference (0-255) that still counts as a match."),
) -> None:
    """Re-render one image from its own metadata and report whether the pixels match."""
    from imagegen.reproduce import reproduce_image

    result = reproduce_image(image, device=device, dtype=dtype, out=out, tolerance=tolerance)
    verdict = "match" if result.max_diff <= tolerance else "DIFFERENT"
    typer.echo(f"{image}: {verdict}: max pixel difference {result.max_diff}/255, mean {result.mean_diff:.4f} "
               f"(job {result.index}, seed {result.seed}, {result.device} {result.dtype})")
    if result.explanation():
        typer.echo(f"  {result.explanation()}")
    if result.max_diff > tolerance:
        raise typer.Exit(1)
