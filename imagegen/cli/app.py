"""The typer application object and the one place that turns errors into exit codes.

Command modules (`imagegen/cli/<area>.py`) register on `app`; none of them imports torch
at module level, so `imagegen --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
import typer.core

from imagegen.errors import ImagegenError, disk_full, is_disk_full


class _Command(typer.core.TyperCommand):
    """A command whose help reads the way people type it: `RUN...` in the usage line (not
    `{RUN...}...`), no `<bool>` after a flag (a person then types `--json true`), no type after
    an argument (its help says what it is). Each command's epilog holds its examples."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain_help(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_help(option)
        return option


def _plain_help(param: Any) -> None:
    if isinstance(param, typer.core.TyperArgument):
        param.display_type_rich = lambda ctx: None
        def usage(param: Any = param) -> str:
            name = param.display_name_raw if param.required else f"[{param.display_name_raw}]"
            return name + ("..." if param.nargs != 1 else "")

        param._usage_display_name = usage
    elif getattr(param, "is_flag", False):
        param.display_type_rich = lambda ctx: None


class _App(typer.Typer):
    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


def examples(*lines: str) -> str:
    """An epilog of example command lines for a help page."""
    return "Examples:\n\n" + "\n\n".join(lines)


app = _App(
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


def silence_closed_streams() -> None:
    """Point stdout and stderr at /dev/null once their reader is gone, so that later writes
    (and Python's flush at exit) neither raise nor print a traceback."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(null, stream.fileno())
        except (OSError, ValueError):
            pass
    os.close(null)


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
    except BrokenPipeError:  # the reader of our output went away: nothing left to tell it
        silence_closed_streams()
        return 1
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        err(disk_full(exc.filename or "writing").message)
        return 1
    return 0
