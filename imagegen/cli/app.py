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


def err(message: str) -> None:
    """Print one user-facing line (or several) to stderr."""
    typer.echo(message, err=True)


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code; `ImagegenError` becomes its message and code."""
    try:
        rv = app(args=argv, standalone_mode=False)
    except ImagegenError as exc:
        err(exc.message)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        err("imagegen: interrupted")
        return 130
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return 2
        if isinstance(exc, click.exceptions.Abort):
            err("imagegen: aborted")
            return 130
        raise
    return rv if isinstance(rv, int) else 0
