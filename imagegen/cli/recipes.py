"""`imagegen validate` and `imagegen plan`: recipe checks and job listings, no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from imagegen.cli.app import app, err, examples
from imagegen.errors import RecipeError


@app.command(epilog=examples("imagegen validate recipes/example.yaml", "imagegen validate recipes/*.yaml"))
def validate(
    recipes: List[Path] = typer.Argument(..., metavar="RECIPE", help="Recipe files to check.", show_default=False),
    allow_download: bool = typer.Option(False, "--allow-download", help="Accept hub ids as checkpoints."),
) -> None:
    """Check recipes without loading any model: syntax, keys, files, variants, job cap."""
    from imagegen.plan import count_jobs
    from imagegen.recipe import load_recipe

    failed = 0
    for path in recipes:
        try:
            recipe = load_recipe(path, allow_download=allow_download)
        except RecipeError as exc:
            failed += 1
            err(exc.message)
            continue
        for note in recipe.notes:
            err(f"{note} (warning)")
        typer.echo(f"{path}: ok, {count_jobs(recipe)} jobs")
    if failed:
        raise typer.Exit(2)


@app.command("plan", epilog=examples("imagegen plan recipes/example.yaml --limit 5",
                                       "imagegen plan recipes/example.yaml --json > jobs.json"))
def plan_cmd(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe file.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the full job list as JSON."),
    limit: int = typer.Option(20, "--limit", min=0, help="How many jobs the table shows."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Accept hub ids as checkpoints."),
) -> None:
    """Show what a recipe expands to: axes, counts, total and the first jobs."""
    from imagegen.plan import pixel_summary, plan
    from imagegen.recipe import axis_counts, load_recipe

    recipe = load_recipe(recipe_path, allow_download=allow_download, check_files=False)
    for warning in recipe.warnings:
        err(f"{warning} (warning: `imagegen validate` and `render` need it)")
    for note in recipe.notes:
        err(f"{note} (warning)")
    jobs = plan(recipe)
    if as_json:
        typer.echo(json.dumps({"recipe": recipe.name, "recipe_sha256": recipe.sha256, "total": len(jobs), "jobs": [j.to_dict() for j in jobs]}, indent=1, ensure_ascii=False))
        return

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # user text (names, paths, prompts) is printed as text, never as markup

    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=False, width=160)
    console.print(Text.assemble((recipe.name, "bold"), f"  {recipe.path}  model {recipe.checkpoint} ({recipe.family})  output {recipe.output}"))
    axes = Table(title="Axes (outermost first)", title_justify="left")
    axes.add_column("axis")
    axes.add_column("values", justify="right")
    for label, n in axis_counts(recipe):
        axes.add_row(Text(label), str(n))
    axes.add_row("[bold]total jobs[/bold]", f"[bold]{len(jobs)}[/bold]")
    console.print(axes)
    console.print(f"Pixels: {pixel_summary(jobs)}")
    from imagegen.history import estimate

    console.print(estimate(jobs).describe())
    if limit:
        table = Table(title=f"First {min(limit, len(jobs))} of {len(jobs)} jobs", title_justify="left")
        hires = any(j.hires for j in jobs)
        photo = any(j.input for j in jobs)
        cols = ("#", "id", "seed", "size", *(("hires", "denoise") if hires else ()), *(("input", "strength") if photo else ()),
                "steps", "cfg", "scheduler", "loras", "prompt")
        for col in cols:
            table.add_column(col, overflow="fold" if col == "prompt" else "ellipsis", no_wrap=col != "prompt")
        for j in jobs[:limit]:
            loras = ", ".join(f"{lu.name}:{lu.weight:g}" for lu in j.loras) or "-"
            hr = (f"{j.hires.width}x{j.hires.height}", f"{j.hires.denoise:g}") if j.hires else (("-", "-") if hires else ())
            ph = ((Text(dict(j.axes).get("input", "-")), f"{j.input.denoise:g}") if j.input else ("-", "-")) if photo else ()
            table.add_row(str(j.index), j.id, str(j.seed), f"{j.width}x{j.height}", *hr, *ph, str(j.steps), f"{j.guidance:g}",
                          j.scheduler, Text(loras), Text(j.prompt))
        console.print(table)


@app.command("import", epilog=examples("imagegen import 00042.png -o start.yaml --lora-dir loras --model-dir models",
                                         "imagegen import civitai-infotext.txt --model models/dreamshaper_8.safetensors"))
def import_cmd(
    source: Path = typer.Argument(..., metavar="IMAGE.png|INFOTEXT.txt", help="An image with metadata, or A1111 infotext.",
                                  show_default=False),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the recipe here (default: print it)."),
    lora_dir: Optional[Path] = typer.Option(None, "--lora-dir", help="Folder to find the LoRAs in (by AddNet hash, then name)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint to use (default: found by name/hash in --model-dir)."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Folder to find the checkpoint in."),
    name: Optional[str] = typer.Option(None, "--name", help="Recipe name (default: the file name)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
) -> None:
    """Turn an A1111, civitai, ComfyUI (A1111 text) or imagegen image into a recipe."""
    from imagegen.errors import InputError
    from imagegen.importer import import_image

    if out is not None and out.exists() and not force:
        raise InputError(f"`--out` {out} exists; pass --force to overwrite it")
    result = import_image(source, lora_dir=lora_dir, model=model, model_dir=model_dir, name=name)
    if out is None:
        typer.echo(result.text, nl=False)
    else:
        from imagegen.fsutil import write_bytes_atomic

        write_bytes_atomic(out, result.text.encode("utf-8"))
        typer.echo(f"{out}: recipe written")
    for note in result.notes:
        err(f"imagegen import: {note}")
