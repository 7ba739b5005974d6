"""The serve GPU queue: submit through the API (admin only), order, cancel, resume after a
restart, two real tiny renders one after the other with the model kept loaded, and the
`imagegen submit/queue/cancel` commands against a live server."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")

from starlette.testclient import TestClient  # noqa: E402

from imagegen.cli import run_app  # noqa: E402
from imagegen.serve.app import create_app  # noqa: E402
from imagegen.serve.queue import Queue  # noqa: E402
from imagegen.serve.tokens import load_tokens  # noqa: E402

TINY = "name: {name}\nmodel:\n  checkpoint: builtin:tiny-sd15\nprompt: a {{red|blue}} cup\nseeds: 1\nsize: 64x64\nsteps: 2\n"


@pytest.fixture
def root(tmp_path):
    (tmp_path / "runs").mkdir()
    return tmp_path / "runs"


def fake_render(log):
    def render(queue, row, progress, should_stop):
        log.append(row["name"])
        progress(1, 2)
        stopped = should_stop()
        return SimpleNamespace(interrupted=stopped, rendered=1, failed=0, left=1 if stopped else 0)
    return render


def api(root, queue, token_name="admin"):
    tokens = load_tokens(root, create=True)
    c = TestClient(create_app(root, tokens, queue=queue))
    c.headers["Authorization"] = f"Bearer {getattr(tokens, token_name)}"
    return c


def submit(c, tmp_path, name, extra=""):
    return c.post("/api/queue", json={"recipe": TINY.format(name=name) + extra, "base_dir": str(tmp_path), "who": "ann"})


def test_admin_queues_viewer_may_not(root, tmp_path):
    queue = Queue(root, root / ".imagegen-serve" / "queue.sqlite", render=fake_render([]))
    viewer = api(root, queue, "viewer")
    assert submit(viewer, tmp_path, "a").status_code == 403
    assert viewer.get("/api/queue").status_code == 403
    admin = api(root, queue)
    r = submit(admin, tmp_path, "a")
    assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["output"] == str(root.resolve() / "a")
    bad = admin.post("/api/queue", json={"recipe": "name: b\nmodel: {checkpoint: builtin:tiny-sd15}\nprompt: x\nstepz: 2\n",
                                         "base_dir": str(tmp_path)})
    assert bad.status_code == 400 and "stepz" in bad.json()["error"]
    outside = submit(admin, tmp_path, "c", f"output: {tmp_path / 'elsewhere'}\n")
    assert outside.status_code == 400 and "outside" in outside.json()["error"]
    assert [e["name"] for e in admin.get("/api/queue").json()["entries"]] == ["a"]
    assert "GPU queue" in admin.get("/").text and "ann" in admin.get("/").text
    assert "GPU queue" not in viewer.get("/").text  # the viewer does not see who queued what


def test_order_cancel_and_resume_after_a_restart(root, tmp_path):
    log: list[str] = []
    path = root / ".imagegen-serve" / "queue.sqlite"
    queue = Queue(root, path, render=fake_render(log))
    ids = [queue.submit(TINY.format(name=n), base_dir=str(tmp_path)).id for n in ("one", "two", "three", "four")]
    assert queue.cancel(ids[2]).status == "cancelled"
    assert queue._claim()["id"] == ids[0]  # the server dies while rendering "one"
    queue._conn.close()

    queue = Queue(root, path, render=fake_render(log))  # restart
    assert queue.get(ids[0]).status == "queued"
    while queue.run_next() is not None:
        pass
    assert log == ["one", "two", "four"]
    assert [e.status for e in queue.entries()] == ["done", "done", "cancelled", "done"]
    assert queue.get(ids[0]).done == 1 and queue.get(ids[0]).total == 2
    with pytest.raises(Exception, match="already done"):
        queue.cancel(ids[0])


def test_cancel_of_a_running_recipe_stops_it(root, tmp_path):
    path = root / ".imagegen-serve" / "queue.sqlite"

    def render(queue, row, progress, should_stop):
        queue.cancel(row["id"])  # as if `imagegen cancel` came in mid-render
        return SimpleNamespace(interrupted=should_stop(), rendered=0, failed=0, left=2)

    queue = Queue(root, path, render=render)
    queue.submit(TINY.format(name="x"), base_dir=str(tmp_path))
    assert queue.run_next().status == "cancelled"


def test_two_submits_render_one_after_the_other_with_the_model_kept(root, tmp_path, one_thread):
    queue = Queue(root, root / ".imagegen-serve" / "queue.sqlite", device="cpu")
    admin = api(root, queue)
    first, second = (submit(admin, tmp_path, n).json()["id"] for n in ("first", "second"))
    queue.start()
    try:
        deadline = time.monotonic() + 600
        while {e["status"] for e in admin.get("/api/queue").json()["entries"]} - {"done", "failed"}:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        queue.stop()
    queue = Queue(root, root / ".imagegen-serve" / "queue.sqlite")
    e1, e2 = queue.get(first), queue.get(second)
    assert (e1.status, e2.status) == ("done", "done"), (e1.message, e2.message)
    assert e1.finished_at <= e2.started_at  # one after the other
    assert (e1.done, e1.total) == (2, 2)
    for name in ("first", "second"):
        assert len(list((root / name / "images").glob("*.png"))) == 2
        assert (root / name / "sheets" / "index.html").is_file()
    runs = {r["name"]: r for r in api(root, None, "viewer").get("/api/runs").json()["runs"]}
    assert runs["first"]["done"] == 2 and runs["second"]["done"] == 2


def test_the_cache_keeps_one_model_for_the_same_checkpoint(root, tmp_path, one_thread):
    queue = Queue(root, root / ".imagegen-serve" / "queue.sqlite", device="cpu")
    for n in ("p", "q"):
        queue.submit(TINY.format(name=n), base_dir=str(tmp_path))
    while queue.run_next() is not None:
        pass
    assert queue.engine_cache.loads == 1
    queue.engine_cache.release()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_queue_cancel_commands_against_a_live_server(root, tmp_path, capsys):
    import uvicorn

    recipe = tmp_path / "cup.yaml"
    recipe.write_text(TINY.format(name="cup"))
    queue = Queue(root, root / ".imagegen-serve" / "queue.sqlite", render=fake_render([]))  # no worker: entries wait
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(root, load_tokens(root, create=True), queue=queue),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        assert run_app(["submit", str(recipe), str(recipe), "--dir", str(root), "--server", url]) == 0
        out = capsys.readouterr().out
        assert "queued #1 cup" in out and "queued #2 cup" in out
        assert run_app(["queue", "--dir", str(root), "--server", url]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and "queued" in lines[0] and "cup" in lines[0] and "@" in lines[0]
        assert run_app(["cancel", "2", "--dir", str(root), "--server", url]) == 0
        assert "#2 cup: cancelled" in capsys.readouterr().out
        assert run_app(["cancel", "2", "--dir", str(root), "--server", url]) == 1
        assert "already cancelled" in capsys.readouterr().err
        # without a server: one clear line
        assert run_app(["queue", "--dir", str(root), "--server", f"http://127.0.0.1:{_free_port()}"]) == 1
        assert "cannot reach the server" in capsys.readouterr().err
    finally:
        server.should_exit = True
        thread.join(10)
