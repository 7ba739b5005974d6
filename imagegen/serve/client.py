"""The command-line side of the queue: `imagegen submit`, `queue`, `cancel` talk to a running
`imagegen serve` over HTTP with the admin token (standard library only: no extra needed)."""

from __future__ import annotations

import getpass
import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from imagegen.errors import ImagegenError, InputError
from imagegen.serve.tokens import load_tokens, state_dir

SERVER_FILE = "server.json"  # written by the server into its state folder
TIMEOUT = 30.0  # seconds for one request to the server


class ServerError(ImagegenError):
    """The server refused a request or cannot be reached."""


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    @classmethod
    def for_dir(cls, root: Path, url: str | None = None) -> "Client":
        """The server for DIR `root`: its URL from server.json (unless `url`), the admin token
        from tokens.json or $IMAGEGEN_SERVE_TOKEN. Raises InputError when neither is there."""
        token = os.environ.get("IMAGEGEN_SERVE_TOKEN") or load_tokens(root).admin
        if url is None:
            info = state_dir(root) / SERVER_FILE
            try:
                url = json.loads(info.read_text(encoding="utf-8"))["url"]
            except (OSError, ValueError, KeyError):
                raise InputError(f"{root}: no server found ({info} missing); start `imagegen serve {root}` "
                                 "or pass --server URL") from None
        return cls(url, token)

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error") or exc.reason
            except ValueError:
                reason = exc.reason
            raise ServerError(f"server {self.url}: {exc.code} {reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach the server at {self.url} ({reason}); is `imagegen serve` running?") from None

    def submit(self, recipe: Path) -> dict:
        recipe = Path(recipe)
        try:
            text = recipe.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{recipe}: cannot read the recipe ({exc})") from None
        who = f"{getpass.getuser()}@{socket.gethostname()}"
        return self.call("POST", "/api/queue", {"recipe": text, "base_dir": str(recipe.resolve().parent),
                                                "source": str(recipe), "who": who})

    def entries(self) -> list[dict]:
        return self.call("GET", "/api/queue")["entries"]

    def cancel(self, entry_id: int) -> dict:
        return self.call("POST", "/api/queue", {"cancel": entry_id})
