"""The Python API: the whole flow without the CLI, for scripts around the tool.

    from imagegen.api import load_recipe, plan, render, status, pick, sheet, upscale

Each function is one arrow of the data flow and calls the same code as the matching command
(the CLI's `status`, `pick` and `sheet` call these). `status`, `pick` and `sheet` take no lock:
they work while a render writes into the same folder.
Nothing here prints; errors are `imagegen.errors.ImagegenError` subclasses with a one-line
message (`RecipeError` lists every problem of a recipe). torch loads only when `render` or
`upscale` loads a model.

(The names live in `imagegen.api`, not in `imagegen` itself, because `imagegen.plan`,
`imagegen.render` and `imagegen.upscale` are modules of the package.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from imagegen.plan import Job
    from imagegen.recipe import Recipe
    from imagegen.render import Event, RenderSummary
    from imagegen.upscale.run import UpscaleResult

__all__ = ["load_recipe", "plan", "render", "status", "pick", "sheet", "upscale"]


def load_recipe(source: str | Path | Mapping[str, Any], *, base_dir: str | Path = ".", allow_download: bool = False,
                check_files: bool = True) -> Recipe:
    """A validated recipe from a YAML file (a path) or from Python data (a dict with the same
    keys as the file; its relative paths resolve against `base_dir`).

    With `check_files=False`, missing model files become `Recipe.warnings` instead of errors.
    Raises RecipeError listing every problem as `source:line:col: message`."""
    from imagegen import recipe as R

    if isinstance(source, Mapping):
        return R.recipe_from_dict(source, base_dir=base_dir, allow_download=allow_download, check_files=check_files)
    return R.load_recipe(source, allow_download=allow_download, check_files=check_files)


def plan(recipe: Recipe) -> list[Job]:
    """Every job of the recipe in plan order, each with its `index` and stable `id`. Pure: no
    disk, no model. Raises nothing for a validated recipe."""
    from imagegen.plan import plan as plan_jobs

    return plan_jobs(recipe)


def render(
    recipe: Recipe,
    *,
    output: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    wait: bool = False,
    sheets: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
    adopt: bool = False,
    workers: int | None = None,
    gpus: str | None = None,
    ray: str | None = None,
    ray_actors: int | None = None,
    ray_config: str | Path | None = None,
    until: str | None = None,
    max_hours: float | None = None,
    max_kwh: float | None = None,
    compile: bool | None = None,
) -> RenderSummary:
    """Render the recipe's pending jobs into its run folder (`output`, default `recipe.output`),
    resuming what an earlier run left, then write the contact sheets (unless `sheets=False`).

    `on_progress(done, total)` is called after each finished image (`total`: images this call
    renders); `on_event(event)` receives every event dict that `log.jsonl` records;
    `should_stop()` returning a reason stops after the current batch (the images already
    generated are still written). `until` ("07:00"), `max_hours` and `max_kwh` stop the render
    before a batch would pass them (`summary.budget_reached` says why); `compile` runs the UNet
    and VAE decoder through torch.compile (None: the recipe's `render.compile`, else the defaults
    file's, else not). Raises RunLockedError when another process renders into the
    folder (unless `wait`), InputError / ModelError for unusable settings or model files,
    DiskFullError when the disk fills (finished images are kept). A folder that is not empty and
    not a run, or a run of another recipe name (unless `adopt`), is refused with InputError.
    `gpus` ("all", "0,2") or `workers` (N processes on `device`) render with several worker
    processes, as the CLI's `--gpus` / `--workers`; `ray` ("auto" or the head's "HOST:PORT") renders on
    a Ray cluster, as `--ray` (`ray_actors`, `ray_config` as `--ray-actors`, `--ray-config`)."""
    from imagegen.render import RenderOptions, render_recipe
    from imagegen.sheets import write_run_sheets
    from imagegen.store import RunStore

    folder = Path(output) if output is not None else recipe.output
    progress = {"done": 0, "total": 0}

    def events(event: Event) -> None:
        if event.get("event") == "start":
            progress["total"] = int(event.get("to_render") or 0)
        elif event.get("event") in ("image", "failed"):
            progress["done"] += 1
            if on_progress is not None:
                on_progress(progress["done"], progress["total"])
        if on_event is not None:
            on_event(event)

    from imagegen.render.budget import Budget

    budget = Budget.from_options(until=until, max_hours=max_hours, max_kwh=max_kwh)
    options = RenderOptions(device=device, dtype=dtype, limit=limit, retry_failed=retry_failed, batch_size=batch_size,
                            budget=budget, compile=compile)
    if ray is not None:
        import functools

        from imagegen.clusterconfig import load_cluster_config
        from imagegen.render.ray_driver import render_with_ray

        if workers is not None or gpus is not None:
            from imagegen.errors import InputError

            raise InputError("`ray` and `workers`/`gpus`: give one")
        render_recipe = functools.partial(render_with_ray, address=ray, actors=ray_actors,
                                          config=load_cluster_config(ray_config) if ray_config else None)
    elif workers is not None or gpus is not None:
        import functools

        from imagegen.render.workers import render_with_workers, worker_devices

        render_recipe = functools.partial(render_with_workers, devices=worker_devices(workers=workers, gpus=gpus, device=device))
    with RunStore.open(folder, wait=wait, recipe_name=recipe.name, adopt=adopt) as store:
        summary = render_recipe(recipe, store, options=options, on_event=events,
                                should_stop=should_stop or (lambda: None))
        if sheets:
            write_run_sheets(store)
        return summary


def status(run: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """Where a run stands, as `imagegen status --json` prints it: done, pending, failed,
    orphaned, total, rate, eta_seconds, last_error, orphans; with `verify`, also `damaged`
    (done images missing or not matching their recorded sha256). Raises InputError when `run`
    is not a run folder."""
    from imagegen.store import RunStore

    with RunStore.open(Path(run), create=False, lock=False) as store:
        out = store.status()
        if verify:
            out["damaged"] = store.verify_files()
        return out


def pick(run: str | Path, *picks: int | str, remove: bool = False, clear: bool = False,
         from_file: str | Path | None = None, on_warning: Callable[[str], None] | None = None) -> list[int]:
    """Change a run's picks and return the whole pick list (sorted job indices).

    `picks` are job indices, ranges ("12-15") or job ids, added (or removed with `remove`);
    `clear` empties the list first; `from_file` replaces it with a picks.txt list (as exported
    by index.html; picks changed on the command line since that page was written win, and
    `on_warning` lists them). Writes picks.txt atomically under the picks lock, mirrors it into
    the manifest and refreshes sheets/index.html. Raises InputError (nothing written) for an
    index or id that is not in the run."""
    from imagegen.picks import update_picks
    from imagegen.sheets.run import write_run_index
    from imagegen.store import RunStore

    with RunStore.open(Path(run), create=False, lock=False) as store:
        return update_picks(store, [str(p) for p in picks], from_file=Path(from_file) if from_file else None,
                            remove=remove, clear=clear, on_warning=on_warning or (lambda message: None),
                            after=lambda chosen: write_run_index(store, chosen))


def sheet(run: str | Path, *, by: str | None = None, x: str | None = None, y: str | None = None,
          per_page: int = 100) -> tuple[list[Path], Path]:
    """Write a run's contact sheets and index.html; returns (sheet pages, index.html).

    `by` starts a section per value of an axis; `x`/`y` lay out an X/Y grid (axis names as in
    `Job.axes`: seed, prompt, guidance, lora:NAME, ...). Raises InputError for an unknown axis
    or a folder that is not a run."""
    from imagegen.sheets import write_run_sheets
    from imagegen.store import RunStore

    with RunStore.open(Path(run), create=False, lock=False) as store:
        return write_run_sheets(store, by=by, x=x, y=y, max_per_page=per_page)


def upscale(
    target: str | Path | Sequence[str | Path],
    *,
    model: str | Path | None = None,
    scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    out: str | Path | None = None,
    tile: int | None = None,
    fmt: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    on_message: Callable[[str], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> UpscaleResult:
    """Upscale a run's picks (`target` a run folder: into RUN/upscaled, with the recipe's
    `upscale:` settings unless given here) or image files (`target` a list of paths).

    Outputs that exist are skipped (a rerun resumes); each is written atomically.
    `on_message(line)` receives the plan and result lines the CLI prints; `on_progress(label,
    tiles_done, tiles_total)` the tile progress. Returns the written and skipped paths.
    Raises InputError for no picks, a pick not rendered, no model or target size, or bad
    images; ModelError for unusable weights."""
    from imagegen.defaults import DEFAULT_FORMAT
    from imagegen.upscale.run import is_run_folder, upscale_files, upscale_run

    progress = None
    if on_progress is not None:
        def progress(label: str) -> Callable[[int, int], None]:
            return lambda done, total: on_progress(label, done, total)

    common: dict[str, Any] = dict(
        scale=scale, width=width, height=height, out=Path(out) if out is not None else None, tile=tile,
        device=device, dtype=dtype, on_message=on_message or (lambda line: None), progress=progress,
    )
    if isinstance(target, (str, Path)) and is_run_folder(Path(target)):
        return upscale_run(Path(target), model=Path(model) if model else None, fmt=fmt, **common)
    images = [Path(target)] if isinstance(target, (str, Path)) else [Path(p) for p in target]
    return upscale_files(images, model=Path(model) if model else None, fmt=fmt or DEFAULT_FORMAT, **common)
