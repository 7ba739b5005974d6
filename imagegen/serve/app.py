"""The review server: a Starlette app over the run folders under DIR.

Security model (every request, in `Guard`):
- a token is required: `?token=` once in the URL (the server then sets an HttpOnly,
  SameSite=Strict cookie and redirects to the same URL without it), the cookie afterwards, or
  `Authorization: Bearer` for command-line clients; anything else gets the same bare 401, so
  nothing about runs is learnt without a token;
- two roles: viewer (browse and pick) and admin (also the queue);
- state changes are POSTs with a JSON body; cookie sessions must send the page's CSRF token
  in `X-CSRF-Token` and, when the browser sends an Origin, it must be this server's;
- every path a request names is resolved inside DIR (`imagegen.serve.runs`);
- responses carry a nonce-based Content-Security-Policy, no-referrer and nosniff.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from imagegen.errors import ImagegenError, InputError
from imagegen.serve import pages, runs
from imagegen.serve.tokens import Tokens, state_dir

COOKIE = "imagegen_token"
COOKIE_MAX_AGE = 30 * 24 * 3600  # a review link keeps working for a month on the same device
MAX_BODY = 64 * 1024  # bytes of a JSON request body at most
UNAUTHORIZED = "401 unauthorized: open the link with ?token=... that `imagegen serve` printed\n"


def _csp(nonce: str) -> str:
    return ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
            f"script-src 'nonce-{nonce}'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class Guard:
    """ASGI middleware: authenticate every HTTP request, check CSRF on POSTs, add headers."""

    def __init__(self, app: Any, tokens: Tokens) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        response = self._check(request, scope)
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["nonce"] = nonce

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", _csp(nonce))
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Cache-Control", "no-store")
            await send(message)

        if response is not None:
            await response(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)

    def _check(self, request: Request, scope: dict) -> Response | None:
        given = request.query_params.get("token")
        if given is not None:
            role = self.tokens.role_of(given)
            if role is None or request.method != "GET":
                return PlainTextResponse(UNAUTHORIZED, status_code=401)
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + ("?" + urlencode(rest) if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, given, max_age=COOKIE_MAX_AGE, httponly=True, samesite="strict", path="/",
                                secure=request.url.scheme == "https")
            return response
        auth = request.headers.get("authorization", "")
        via = "bearer" if auth.lower().startswith("bearer ") else "cookie"
        token = auth[7:].strip() if via == "bearer" else request.cookies.get(COOKIE)
        role = self.tokens.role_of(token)
        if role is None:
            return PlainTextResponse(UNAUTHORIZED, status_code=401)
        if request.method not in ("GET", "HEAD"):
            if request.method != "POST":
                return JSONResponse({"error": "only GET and POST"}, status_code=405)
            if via == "cookie":
                origin = request.headers.get("origin")
                host = request.headers.get("host", "")
                if origin is not None and origin.split("://", 1)[-1] != host:
                    return JSONResponse({"error": "cross-site request refused (Origin is not this server)"}, status_code=403)
                sent = request.headers.get("x-csrf-token", "")
                if not hmac.compare_digest(sent.encode(), self.tokens.csrf_for(token).encode()):
                    return JSONResponse({"error": "missing or wrong CSRF token; reload the page"}, status_code=403)
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return JSONResponse({"error": "POST bodies are JSON (Content-Type: application/json)"}, status_code=415)
        scope.setdefault("state", {}).update(role=role, token=token)
        return None


def _not_found() -> Response:
    return PlainTextResponse("404 not found\n", status_code=404)


def create_app(root: str | Path, tokens: Tokens, *, queue: Any = None) -> Starlette:
    """The server for the run folders under `root`; `queue` (an `imagegen.serve.queue.Queue`)
    answers /api/queue for the admin token."""
    root = Path(root).resolve()
    previews = state_dir(root) / "previews"

    def page_kw(request: Request) -> dict[str, str]:
        return {"role": request.state.role, "csrf": tokens.csrf_for(request.state.token), "nonce": request.state.nonce}

    def run_of(request: Request) -> tuple[str, Path]:
        name = request.query_params.get("run", "")
        return name, runs.resolve_run(root, name)

    def html(text: str) -> HTMLResponse:
        return HTMLResponse(text)

    def index(request: Request) -> Response:
        summaries = [runs.run_summary(root, name) for name in runs.find_runs(root)]
        entries = [x.as_dict() for x in queue.entries()] if queue is not None and request.state.role == "admin" else []
        return html(pages.runs_page(summaries, entries, **page_kw(request)))

    def api_runs(request: Request) -> Response:
        return JSONResponse({"runs": [runs.run_summary(root, name) for name in runs.find_runs(root)]})

    def gallery(request: Request) -> Response:
        name, folder = run_of(request)
        title, items = runs.gallery(folder)
        return html(pages.gallery_page(name, title, items, runs.current_picks(folder), **page_kw(request)))

    def compare(request: Request) -> Response:
        name, folder = run_of(request)
        title, items = runs.gallery(folder)
        try:
            wanted = [int(i) for i in request.query_params.getlist("i")][:4]
        except ValueError:
            return JSONResponse({"error": "i= takes job indices"}, status_code=400)
        by_index = {it.index: it for it in items}
        chosen = [by_index[i] for i in wanted if i in by_index]
        return html(pages.compare_page(name, title, chosen, runs.current_picks(folder), **page_kw(request)))

    def deliveries(request: Request) -> Response:
        name, folder = run_of(request)
        title, _ = runs.gallery(folder)
        return html(pages.deliveries_page(name, title, runs.deliveries(folder), **page_kw(request)))

    def file(request: Request) -> Response:
        _, folder = run_of(request)
        path = runs.resolve_file(folder, request.query_params.get("kind", ""), request.query_params.get("name", ""))
        headers = {"Cache-Control": "private, max-age=3600"}
        if request.query_params.get("download"):
            return FileResponse(path, filename=path.name, headers=headers)
        return FileResponse(path, headers=headers)

    def preview(request: Request) -> Response:
        _, folder = run_of(request)
        path = runs.resolve_file(folder, "upscaled", request.query_params.get("name", ""))
        return FileResponse(runs.preview(path, previews), media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=3600"})

    async def api_picks(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        _, folder = run_of(request)
        if request.method == "GET":
            return JSONResponse(await run_in_threadpool(runs.current_picks, folder))
        body = await _json_body(request)
        index, picked, note = body.get("index"), body.get("picked", True), body.get("note")
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(picked, bool) or (
                note is not None and not isinstance(note, str)):
            return JSONResponse({"error": "send {index: int, picked: bool, note?: str}"}, status_code=400)
        return JSONResponse(await run_in_threadpool(runs.set_pick, folder, index, picked, note))

    routes = [
        Route("/", index), Route("/api/runs", api_runs), Route("/gallery", gallery), Route("/compare", compare),
        Route("/deliveries", deliveries), Route("/file", file), Route("/preview", preview),
        Route("/api/picks", api_picks, methods=["GET", "POST"]),
    ]
    async def api_queue(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        if (refused := require_admin(request)) is not None:
            return refused
        if queue is None:
            return JSONResponse({"error": "this server has no queue (started with --no-queue)"}, status_code=404)
        if request.method == "GET":
            return JSONResponse({"entries": [e.as_dict() for e in await run_in_threadpool(queue.entries)]})
        body = await _json_body(request)
        if "cancel" in body:
            if not isinstance(body["cancel"], int) or isinstance(body["cancel"], bool):
                return JSONResponse({"error": "send {cancel: ID}"}, status_code=400)
            return JSONResponse((await run_in_threadpool(queue.cancel, body["cancel"])).as_dict())
        text, base_dir = body.get("recipe"), body.get("base_dir")
        source, who = body.get("source"), body.get("who")
        if not isinstance(text, str) or not isinstance(base_dir, str) or not all(
                v is None or isinstance(v, str) for v in (source, who)):
            return JSONResponse({"error": "send {recipe: YAML text, base_dir: absolute folder, source?, who?}"},
                                status_code=400)
        entry = await run_in_threadpool(lambda: queue.submit(text, base_dir=base_dir, source=source, who=who))
        return JSONResponse(entry.as_dict())

    routes.append(Route("/api/queue", api_queue, methods=["GET", "POST"]))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _not_found()

    async def input_error(request: Request, exc: InputError) -> Response:
        return JSONResponse({"error": exc.message}, status_code=400)

    async def imagegen_error(request: Request, exc: ImagegenError) -> Response:
        return JSONResponse({"error": exc.message}, status_code=409)

    app = Starlette(routes=routes, exception_handlers={
        runs.NotFound: not_found, InputError: input_error, ImagegenError: imagegen_error, 404: not_found})
    return Guard(app, tokens)  # type: ignore[return-value]


async def _json_body(request: Request) -> dict:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise InputError(f"request body over {MAX_BODY} bytes")
    import json

    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise InputError("request body is not JSON") from None
    if not isinstance(data, dict):
        raise InputError("request body must be a JSON object")
    return data


def require_admin(request: Request) -> Response | None:
    """A 403 response for a viewer, None for the admin."""
    if request.state.role != "admin":
        return JSONResponse({"error": "this needs the admin token (the viewer link may browse and pick only)"},
                            status_code=403)
    return None
