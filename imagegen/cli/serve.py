"""`imagegen serve`: the review server for a team and a client on a tablet."""

from __future__ import annotations

from pathlib import Path

import typer

from imagegen.cli.app import app, examples


@app.command(epilog=examples("imagegen serve runs", "imagegen serve runs --port 9000",
                             "imagegen serve runs --lan    (for the iPad on the same network)"))
def serve(
    folder: Path = typer.Argument(Path("."), metavar="DIR", help="Folder whose run folders are served (default: here)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="TCP port."),
    lan: bool = typer.Option(False, "--lan", help="Bind every interface (0.0.0.0) and print the LAN links."),
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

    run_server(folder, host=LAN_HOST if lan else host, port=port, on_ready=ready)
