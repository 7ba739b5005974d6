"""`imagegen serve`, and the queue's `imagegen submit`, `queue`, `cancel`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from imagegen.cli.app import app, examples

DIR_HELP = "The folder `imagegen serve` serves: its token file and address are found there ($IMAGEGEN_SERVE_DIR)."
SERVER_HELP = "The server's URL (default: the address recorded by the server under DIR)."


@app.command(epilog=examples("imagegen serve runs", "imagegen serve runs --port 9000",
                             "imagegen serve runs --lan    (for the iPad on the same network)"))
def serve(
    folder: Path = typer.Argument(Path("."), metavar="DIR", help="Folder whose run folders are served (default: here)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="TCP port."),
    lan: bool = typer.Option(False, "--lan", help="Bind every interface (0.0.0.0) and print the LAN links."),
    device: Optional[str] = typer.Option(None, "--device", help="Device the queue renders on (default: cuda if available, else cpu)."),
    no_queue: bool = typer.Option(False, "--no-queue", help="Review and picks only: no GPU queue worker."),
) -> None:
    """Serve the runs under DIR for review: progress, galleries, compare, upscaled deliveries, picks.

    Every request needs a token: the admin link (queue) and the viewer link (browse and pick) are printed at start; the tokens live in DIR/.imagegen-serve/tokens.json (mode 0600)."""
    from imagegen.serve.server import LAN_HOST, serve as run_server

    def ready(links: dict[str, str]) -> None:
        typer.echo(f"imagegen serve: {folder.resolve()} on {LAN_HOST if lan else host}:{port} (Ctrl-C stops)")
        typer.echo(f"  admin  (browse, pick, queue): {links['admin']}")
        typer.echo(f"  viewer (browse and pick):     {links['viewer']}")
        if lan:
            typer.echo("  anyone on this network with a link gets in: share the viewer link only")
            from imagegen.serve.qr import terminal_qr

            code = terminal_qr(links["viewer"])
            if code:
                typer.echo("  the viewer link, for a tablet's camera:")
                typer.echo(code)

    run_server(folder, host=LAN_HOST if lan else host, port=port, on_ready=ready, queue=not no_queue, device=device)


def _client(folder: Path, server: Optional[str]):
    from imagegen.serve.client import Client

    return Client.for_dir(folder, server)


def _when(ts: Optional[float]) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@app.command(epilog=examples("imagegen submit recipes/a.yaml recipes/b.yaml --dir runs",
                             "imagegen submit recipes/a.yaml --server http://gpu-box:8765   (token: $IMAGEGEN_SERVE_TOKEN)"))
def submit(
    recipes: List[Path] = typer.Argument(..., metavar="RECIPE", help="Recipe files, queued in this order."),
    folder: Path = typer.Option(Path("."), "--dir", envvar="IMAGEGEN_SERVE_DIR", help=DIR_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
) -> None:
    """Queue recipes on the `imagegen serve` GPU queue; they render one at a time, in order."""
    client = _client(folder, server)
    for recipe in recipes:
        entry = client.submit(recipe)
        typer.echo(f"queued #{entry['id']} {entry['name']} -> {entry['output']}")


@app.command("queue", epilog=examples("imagegen queue --dir runs"))
def queue_list(
    folder: Path = typer.Option(Path("."), "--dir", envvar="IMAGEGEN_SERVE_DIR", help=DIR_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
) -> None:
    """List the server's queue: who submitted what, when, and how far it got."""
    entries = _client(folder, server).entries()
    if not entries:
        typer.echo("the queue is empty")
    for e in entries:
        progress = f"{e['done']}/{e['total']}" if e["total"] else "-"
        typer.echo(f"#{e['id']:<4} {e['status']:<9} {progress:>9}  {e['name']}  {e['who'] or '?'}  "
                   f"submitted {_when(e['submitted_at'])}" + (f"  {e['message']}" if e["message"] else ""))


@app.command(epilog=examples("imagegen cancel 12 --dir runs"))
def cancel(
    entry_id: int = typer.Argument(..., metavar="ID", help="Queue entry number (see imagegen queue)."),
    folder: Path = typer.Option(Path("."), "--dir", envvar="IMAGEGEN_SERVE_DIR", help=DIR_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
) -> None:
    """Cancel a queued recipe, or stop a running one after its current batch."""
    entry = _client(folder, server).cancel(entry_id)
    state = "cancelled" if entry["status"] == "cancelled" else "stops after its current batch"
    typer.echo(f"#{entry['id']} {entry['name']}: {state}")
