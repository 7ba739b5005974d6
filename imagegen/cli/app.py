"""The typer application object and the one place that turns errors into exit codes.

Command modules (`imagegen/cli/<area>.py`) register on `app`; none of them imports torch
at module level, so `imagegen --help` stays fast.
"""

from __future__ import annotations

import typer

from imagegen.errors import ImagegenError

app = typer.Typer(
    name="imagegen",
    help="Offline batch renderer for Stable Diffusion: recipes in, picked and upscaled images out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from imagegen import __version__

        typer.echo(f"imagegen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Offline batch renderer for Stable Diffusion: recipes in, picked and upscaled images out."""


def err(message: str) -> None:
    """Print one user-facing line (or several) to stderr."""
    typer.echo(message, err=True)


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code.

    Usage errors exit 2 (click's own handling); `ImagegenError` becomes its one-line message
    and its exit code. Commands signal other codes with `typer.Exit(code)`."""
    try:
        app(args=argv, prog_name="imagegen")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        err(str(code))
        return 1
    except ImagegenError as exc:
        err(exc.message)
        return exc.exit_code
    return 0
