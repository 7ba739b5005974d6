"""The server's two secrets: an admin token (queue and render) and a viewer token (browse and
pick), generated once into a token file readable by its owner only (mode 0600).

Starlette-free, so the CLI's `submit`/`queue`/`cancel` read the admin token without loading
the server. The file lives in `DIR/.imagegen-serve/tokens.json`, or (when DIR is not writable)
in the cache under `serve/<hash of DIR>/`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from imagegen.defaults import cache_root
from imagegen.errors import InputError

STATE_DIR = ".imagegen-serve"  # the server's own folder under DIR (tokens, queue, previews)
TOKEN_FILE = "tokens.json"
TOKEN_BYTES = 24  # 192 random bits per token, URL-safe base64 (32 characters)
ROLES = ("admin", "viewer")


@dataclass(frozen=True)
class Tokens:
    admin: str
    viewer: str
    path: Path

    def role_of(self, token: str | None) -> str | None:
        """'admin', 'viewer' or None; compared in constant time."""
        if not token:
            return None
        given = token.encode("utf-8", "replace")
        role = None
        for name in ROLES:
            if hmac.compare_digest(given, getattr(self, name).encode()):
                role = name
        return role

    def csrf_for(self, token: str) -> str:
        """The CSRF token a page sends back with each POST: an HMAC of the session token, so it
        proves the page was served to this session and needs no server-side state."""
        return hmac.new(token.encode(), b"imagegen-serve csrf", hashlib.sha256).hexdigest()[:32]


def state_dir(root: Path) -> Path:
    """The server's folder for DIR: DIR/.imagegen-serve when DIR is writable, else in the cache."""
    root = Path(root).resolve()
    if os.access(root, os.W_OK):
        return root / STATE_DIR
    return cache_root() / "serve" / hashlib.sha256(str(root).encode()).hexdigest()[:16]


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InputError(f"{path}: token file is readable by others (mode {mode:o}); "
                         f"run `chmod 600 {path}` or delete it to get new tokens")


def load_tokens(root: Path, *, create: bool = False) -> Tokens:
    """The tokens of the server for DIR `root`; with `create`, generate them the first time
    (file created with O_EXCL and mode 0600, in a 0700 folder). Raises InputError when there is
    no token file (and not `create`), or it is readable by others or malformed."""
    folder = state_dir(root)
    path = folder / TOKEN_FILE
    if create and not path.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {name: secrets.token_urlsafe(TOKEN_BYTES) for name in ROLES}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another server made it a moment ago: read theirs
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
    if not path.is_file():
        raise InputError(f"{root}: no server tokens ({path} is missing); start `imagegen serve {root}` first")
    _check_private(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Tokens(str(data["admin"]), str(data["viewer"]), path)
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: not a token file; delete it and start `imagegen serve` again for new tokens") from None
