"""Start the review server: tokens, the app, uvicorn."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from imagegen.errors import InputError
from imagegen.serve.client import SERVER_FILE
from imagegen.serve.tokens import Tokens, load_tokens, state_dir

LAN_HOST = "0.0.0.0"
QUEUE_FILE = "queue.sqlite"


def lan_address() -> str:
    """This machine's address on its LAN (the interface of the default route); no packet is
    sent (a UDP socket's connect only picks a route). 127.0.0.1 when there is none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def urls(tokens: Tokens, host: str, port: int) -> dict[str, str]:
    shown = lan_address() if host == LAN_HOST else host
    base = f"http://{shown}:{port}/"
    return {"admin": f"{base}?token={tokens.admin}", "viewer": f"{base}?token={tokens.viewer}"}


def check_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError("imagegen serve needs the serve extra: pip install -e '.[serve]' "
                         "(starlette and uvicorn)") from None


def serve(root: Path, *, host: str, port: int, on_ready: Callable[[dict[str, str]], None],
          queue: bool = True, device: str | None = None) -> None:
    """Serve the runs under `root` until interrupted, with the GPU queue's worker (unless
    `queue=False`). Raises InputError for a missing folder or the serve extra not installed."""
    check_extra()
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    import uvicorn

    from imagegen.fsutil import write_bytes_atomic
    from imagegen.serve.app import create_app
    from imagegen.serve.queue import Queue

    tokens = load_tokens(root, create=True)
    folder = state_dir(root)
    worker = Queue(root, folder / QUEUE_FILE, device=device) if queue else None
    app = create_app(root, tokens, queue=worker)
    # Where `imagegen submit/queue/cancel` find this server (the token stays in tokens.json).
    local = f"http://{'127.0.0.1' if host == LAN_HOST else host}:{port}"
    write_bytes_atomic(folder / SERVER_FILE, json.dumps({"url": local, "pid": os.getpid()}).encode())
    on_ready(urls(tokens, host, port))
    if worker is not None:
        worker.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)
    finally:
        if worker is not None:
            worker.stop()
