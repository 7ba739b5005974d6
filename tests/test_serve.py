"""`imagegen serve`: the API through Starlette's TestClient (auth, roles, CSRF, traversal,
picks written through imagegen.picks)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from imagegen.cli import run_app  # noqa: E402
from imagegen.picks import read_pick_notes, read_picks  # noqa: E402
from imagegen.serve.app import COOKIE, create_app  # noqa: E402
from imagegen.serve.tokens import load_tokens  # noqa: E402
from tests.serve_fixtures import make_run  # noqa: E402


@pytest.fixture
def root(tmp_path):
    make_run(tmp_path / "runs" / "alpha", 6, name="alpha <i>")
    make_run(tmp_path / "runs" / "nested" / "beta", 4, done=2)
    (tmp_path / "runs" / "not-a-run").mkdir()
    (tmp_path / "secret.txt").write_text("top secret")
    return tmp_path / "runs"


@pytest.fixture
def tokens(root):
    return load_tokens(root, create=True)


@pytest.fixture
def app(root, tokens):
    return create_app(root, tokens)


def client(app, token=None):
    c = TestClient(app, base_url="http://testserver", follow_redirects=False)
    if token:
        c.cookies.set(COOKIE, token)
    return c


def csrf(tokens, token):
    return {"X-CSRF-Token": tokens.csrf_for(token)}


def test_token_file_is_private_and_stable(root, tokens):
    assert stat.S_IMODE(tokens.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(tokens.path.parent.stat().st_mode) == 0o700
    again = load_tokens(root, create=True)
    assert (again.admin, again.viewer) == (tokens.admin, tokens.viewer)
    assert tokens.admin != tokens.viewer and len(tokens.admin) >= 32
    os.chmod(tokens.path, 0o644)
    with pytest.raises(Exception, match="readable by others"):
        load_tokens(root)


@pytest.mark.parametrize("path", ["/", "/api/runs", "/gallery?run=alpha", "/file?run=alpha&kind=images&name=x.png",
                                  "/api/picks?run=alpha", "/gallery?run=nope", "/nonexistent"])
def test_without_a_token_every_request_gets_the_same_401(app, path):
    c = client(app)
    r = c.get(path)
    assert r.status_code == 401
    assert "alpha" not in r.text and "beta" not in r.text
    assert client(app, "wrong-token").get(path).text == r.text
    assert c.get(path + ("&" if "?" in path else "?") + "token=wrong").status_code == 401


def test_token_in_url_becomes_an_httponly_strict_cookie(app, tokens):
    c = client(app)
    r = c.get(f"/gallery?run=alpha&token={tokens.viewer}")
    assert r.status_code == 303 and r.headers["location"] == "/gallery?run=alpha"  # the token leaves the URL
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={tokens.viewer}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    r = c.get("/gallery?run=alpha")
    assert r.status_code == 200 and "job 1" in r.text
    assert "nonce-" in r.headers["content-security-policy"] and r.headers["referrer-policy"] == "no-referrer"


def test_runs_list_shows_progress(app, tokens):
    c = client(app, tokens.viewer)
    runs = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
    assert set(runs) == {"alpha", "nested/beta"}
    assert (runs["nested/beta"]["done"], runs["nested/beta"]["total"], runs["nested/beta"]["pending"]) == (2, 4, 2)
    assert runs["nested/beta"]["rate"] == pytest.approx(2.0) and runs["nested/beta"]["eta_seconds"] == pytest.approx(1.0)
    page = c.get("/").text
    assert "2/4" in page and "alpha &lt;i&gt;" in page and "<i>" not in page.split("<main>")[1].split("</main>")[0]


@pytest.mark.parametrize("query", [
    "run=../secret.txt", "run=..", "run=alpha/..", "run=/etc", "run=not-a-run", "run=alpha/images",
    "run=alpha&kind=images&name=../../../secret.txt", "run=alpha&kind=..&name=secret.txt",
    "run=alpha&kind=images&name=%2e%2e%2fmanifest.sqlite", "run=alpha&kind=sheets&name=index.html",
    "run=alpha&kind=images&name=.lock",
])
def test_traversal_attempts_are_refused(app, tokens, root, query):
    (root / "alpha" / "images" / "link.png").symlink_to(root.parent / "secret.txt")
    c = client(app, tokens.admin)
    for path in ("/gallery", "/file") if "kind=" not in query else ("/file",):
        r = c.get(f"{path}?{query}")
        assert r.status_code == 404, (path, query)
        assert "top secret" not in r.text
    assert c.get("/file?run=alpha&kind=images&name=link.png").status_code == 404  # a symlink out of the run


def test_files_are_served_from_the_run(app, tokens, root):
    c = client(app, tokens.viewer)
    name = sorted((root / "alpha" / "images").iterdir())[0].name
    r = c.get(f"/file?run=alpha&kind=images&name={name}")
    assert r.status_code == 200 and r.content == (root / "alpha" / "images" / name).read_bytes()


def test_picks_need_csrf_and_json(app, tokens, root):
    c = client(app, tokens.viewer)
    assert c.post("/api/picks?run=alpha", json={"index": 2, "picked": True}).status_code == 403  # no CSRF token
    assert c.post("/api/picks?run=alpha", json={"index": 2, "picked": True},
                  headers={"X-CSRF-Token": tokens.csrf_for(tokens.admin)}).status_code == 403  # another session's
    r = c.post("/api/picks?run=alpha", json={"index": 2, "picked": True},
               headers={**csrf(tokens, tokens.viewer), "Origin": "http://evil.example"})
    assert r.status_code == 403 and "Origin" in r.json()["error"]
    r = c.post("/api/picks?run=alpha", content="index=2", headers={**csrf(tokens, tokens.viewer),
                                                                   "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert c.get("/api/picks?run=alpha&index=2&picked=true").json()["picks"] == []  # GET changes nothing
    assert read_picks(root / "alpha" / "picks.txt") == []


def test_picks_land_in_picks_txt_and_the_shell_sees_them(app, tokens, root, capsys):
    c = client(app, tokens.viewer)
    h = {**csrf(tokens, tokens.viewer), "Origin": "http://testserver"}
    assert c.post("/api/picks?run=alpha", json={"index": 2, "picked": True}, headers=h).json()["picks"] == [2]
    r = c.post("/api/picks?run=alpha", json={"index": 5, "picked": True, "note": "best light\n# x"}, headers=h)
    assert r.json() == {"picks": [2, 5], "notes": {"5": "best light # x"}}
    picks_txt = root / "alpha" / "picks.txt"
    assert read_picks(picks_txt) == [2, 5] and read_pick_notes(picks_txt) == {5: "best light # x"}
    assert run_app(["picks", str(root / "alpha")]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["2", "5"]
    # a pick made from the shell shows in the page and the API
    assert run_app(["pick", str(root / "alpha"), "4"]) == 0
    assert c.get("/api/picks?run=alpha").json()["picks"] == [2, 4, 5]
    assert 'id="job-4" data-index="4"' in c.get("/gallery?run=alpha").text.replace('card picked" ', 'card" ')
    assert c.post("/api/picks?run=alpha", json={"index": 2, "picked": False}, headers=h).json()["picks"] == [4, 5]
    r = c.post("/api/picks?run=alpha", json={"index": 99, "picked": True}, headers=h)
    assert r.status_code == 400 and "not a job index" in r.json()["error"]
    assert read_picks(picks_txt) == [4, 5]


def test_concurrent_pick_posts_are_not_lost(app, tokens, root):
    h = csrf(tokens, tokens.viewer)
    errors = []

    def pick(i):
        try:
            r = client(app, tokens.viewer).post("/api/picks?run=alpha", json={"index": i, "picked": True}, headers=h)
            assert r.status_code == 200
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=pick, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert read_picks(root / "alpha" / "picks.txt") == [1, 2, 3, 4, 5, 6]


def test_bearer_token_needs_no_csrf(app, tokens, root):
    c = TestClient(app)
    r = c.post("/api/picks?run=alpha", json={"index": 3, "picked": True},
               headers={"Authorization": f"Bearer {tokens.viewer}"})
    assert r.status_code == 200 and read_picks(root / "alpha" / "picks.txt") == [3]
    assert c.post("/api/picks?run=alpha", json={"index": 3}, headers={"Authorization": "Bearer nope"}).status_code == 401


def test_compare_and_deliveries(app, tokens, root):
    from PIL import Image
    import numpy as np
    import tifffile

    c = client(app, tokens.viewer)
    page = c.get("/compare?run=alpha&i=1&i=2&i=9").text
    assert page.count('class="card') == 2 and "a chair &lt;b&gt;" in page
    up = root / "alpha" / "upscaled"
    up.mkdir()
    Image.new("RGB", (300, 200), "red").save(up / "0001-x-300w.png")
    tifffile.imwrite(up / "0002-y-5000w.tif", np.full((1000, 5000, 3), 200, np.uint8), tile=(256, 256),
                     compression="zlib", bigtiff=True)
    page = c.get("/deliveries?run=alpha").text
    assert "0001-x-300w.png" in page and "5000×1000 px" in page and "/preview?run=alpha&amp;name=0002-y-5000w.tif" in page
    r = c.get("/preview?run=alpha&name=0002-y-5000w.tif")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    import io

    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (1600, 320)
    assert c.get("/preview?run=alpha&name=../../secret.txt").status_code == 404


def test_serve_help_has_examples():
    from typer.testing import CliRunner

    from imagegen.cli import app as cli_app

    out = CliRunner().invoke(cli_app, ["serve", "--help"]).output
    assert "Examples:" in out and "--lan" in out


def test_concurrent_picks_from_many_writers_are_not_lost(root):
    """Without the server's thread lock: api.pick from many threads at once (each its own
    store and flock on RUN/.picks.lock, as separate `imagegen pick` processes would)."""
    from imagegen.api import pick

    run = root / "alpha"
    barrier = threading.Barrier(6)

    def add(i):
        barrier.wait()
        pick(run, i)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_picks(run / "picks.txt") == [1, 2, 3, 4, 5, 6]


def test_lan_link_as_a_terminal_qr_code():
    import qrcode

    from imagegen.serve.qr import terminal_qr

    link = "http://192.168.1.20:8765/?token=viewer-token-0123456789"
    code = terminal_qr(link)
    lines = code.splitlines()
    assert len(lines) > 10 and len({len(line) for line in lines}) == 1  # a square block of equal lines
    assert set("".join(lines)) <= set(" \xa0▀▄█")  # qrcode draws light modules as no-break spaces
    # the same modules qrcode computes for the link: two rows of modules per text line
    matrix = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    matrix.add_data(link)
    matrix.make(fit=True)
    assert len(lines) == (len(matrix.get_matrix()) + 1) // 2


def test_runs_list_shows_energy_only_when_measured(root, app, tokens):
    from imagegen.store import RunStore

    c = client(app, tokens.viewer)
    runs = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
    assert runs["alpha"]["wh_per_image"] is None and "Wh/image" not in c.get("/").text  # not measured: not shown
    store = RunStore.open(root / "alpha", create=False, lock=False)
    try:
        for row in [r for r in store.rows() if r.status == "done"]:
            store.mark_done(row.id, file=store.folder / row.file, sha256=row.sha256, thumb=None, seconds=0.5, joules=36.0)
    finally:
        store.close()
    run = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}["alpha"]
    assert run["wh_per_image"] == pytest.approx(0.01)
    assert "0.010 Wh/image" in c.get("/").text
