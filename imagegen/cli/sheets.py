"""`imagegen sheet`, `imagegen pick`, `imagegen picks`: choose the keepers of a run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from imagegen.cli.app import app, err, examples


def _open(run: Path):
    from imagegen.store import RunStore

    # No lock: sheets and picks work while a render is writing into the same folder.
    return RunStore.open(run, create=False, lock=False)


@app.command(epilog=examples("imagegen sheet runs/example", "imagegen sheet runs/example --by prompt",
                      "imagegen sheet runs/example --x guidance --y lora:style --per-page 60"))
def sheet(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder.", show_default=False),
    by: Optional[str] = typer.Option(None, "--by", help="New section per value of this axis (prompt, seed, lora_set, lora:NAME, guidance, ...)."),
    x: Optional[str] = typer.Option(None, "--x", help="X/Y grid: axis along the columns."),
    y: Optional[str] = typer.Option(None, "--y", help="X/Y grid: axis along the rows."),
    per_page: int = typer.Option(100, "--per-page", min=1, help="Images per page at most."),
) -> None:
    """Write contact sheets (sheets/sheet-NN.jpg) and sheets/index.html for a run."""
    from imagegen.api import sheet as write_run_sheet

    pages, index = write_run_sheet(run, by=by, x=x, y=y, per_page=per_page)
    for p in pages:
        typer.echo(str(p))
    typer.echo(str(index))


@app.command(epilog=examples("imagegen pick runs/example 12 57 203-210", "imagegen pick runs/example --remove 57",
                      "imagegen pick runs/example --from ~/Downloads/picks.txt", "imagegen pick runs/example --clear"))
def pick(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder.", show_default=False),
    items: Optional[List[str]] = typer.Argument(None, metavar="INDEX", help="Job indices (12), ranges (203-210) or job ids."),
    from_file: Optional[Path] = typer.Option(None, "--from", help="Replace the picks with those in this file (e.g. picks.txt downloaded from index.html)."),
    remove: bool = typer.Option(False, "--remove", help="Remove these picks instead of adding them."),
    clear: bool = typer.Option(False, "--clear", help="Start from an empty pick list."),
) -> None:
    """Add picks to the run's picks.txt, remove them, or replace them from a file; the upscale step reads it."""
    from imagegen.api import pick as set_picks
    from imagegen.errors import InputError
    from imagegen.picks import format_ranges

    if not items and from_file is None and not clear:
        raise InputError("pick: give job indices (12 57 203-210), --from FILE or --clear")
    if remove and clear:
        raise InputError("pick: --remove and --clear do not go together")
    picks = set_picks(run, *(items or []), from_file=from_file, remove=remove, clear=clear, on_warning=err)
    typer.echo(f"{len(picks)} picked: {format_ranges(picks, limit=20) or '(none)'}")


@app.command(epilog=examples("imagegen picks runs/example"))
def picks(
    run: Path = typer.Argument(..., metavar="RUN", help="Run folder.", show_default=False),
) -> None:
    """List the run's picks with their image files."""
    from imagegen.picks import list_picks

    with _open(run) as store:
        rows = list_picks(store)
    if not rows:
        err(f"{run}: no picks yet (imagegen pick {run} 12 57 ...)")
    for index, job_id, path in rows:
        typer.echo(f"{index:>5}  {job_id}  {path if path else '(not rendered yet)'}")
