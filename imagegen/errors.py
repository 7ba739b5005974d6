"""The one exception family that the CLI turns into a message and an exit code."""

from __future__ import annotations

import errno


class ImagegenError(Exception):
    """An error to show the user as is; `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(ImagegenError):
    """Bad input from the user (recipe, arguments, files): exit code 2."""

    exit_code = 2


class RecipeError(InputError):
    """One or more problems in a recipe file, each already formatted as `path:line:col: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ModelError(InputError):
    """A model, LoRA, VAE or upscaler weight file we cannot use (wrong family, unknown layout)."""


class RunLockedError(ImagegenError):
    """Another process holds the run folder's lock."""

    exit_code = 2


class DiskFullError(ImagegenError):
    """The disk filled up while writing; what was finished is kept."""


SQLITE_FULL = 13  # sqlite3 extended error code of a full database or disk


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` means the disk is full: OSError ENOSPC, or SQLite's "database or disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "full" in str(exc).lower()


def disk_full(where: object, detail: str = "") -> DiskFullError:
    """The one DiskFullError message: where, what was kept, and what to do."""
    what = f" ({detail})" if detail else ""
    return DiskFullError(f"{where}: disk full{what}; finished images are kept, free some space and run the same command again to resume")


class StoppedError(ImagegenError):
    """SIGINT/SIGTERM arrived during a long step before rendering (hashing model files): the
    run stops at once, nothing half-done is kept; exit 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signal_name: str, doing: str) -> None:
        super().__init__(f"imagegen: stopped by {signal_name} while {doing}; nothing was rendered yet; "
                         "run the same command again to go on", exit_code=143 if signal_name == "SIGTERM" else 130)
