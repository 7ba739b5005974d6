"""`imagegen serve` in a real browser: Debian's chromium through playwright at an iPad
viewport, against uvicorn on a free local port. Skipped like tests/test_index_browser.py when
playwright or chromium is missing (failed with IMAGEGEN_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from imagegen.picks import read_pick_notes, read_picks  # noqa: E402
from imagegen.serve.app import create_app  # noqa: E402
from imagegen.serve.tokens import load_tokens  # noqa: E402
from tests.serve_fixtures import make_run  # noqa: E402
from tests.test_index_browser import browser  # noqa: E402,F401  (the module-scoped chromium fixture)

IPAD = {"viewport": {"width": 820, "height": 1180}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "shoot", 8, name="shoot")
    tokens = load_tokens(root, create=True)
    port = _free_port()
    config = uvicorn.Config(create_app(root, tokens), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", tokens, root
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def ipad(browser):  # noqa: F811
    context = browser.new_context(**IPAD)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def picked(page) -> list[int]:
    return page.eval_on_selector_all(".card.picked", "cs => cs.map(c => Number(c.dataset.index))")


def test_ipad_open_a_run_pick_two_reload(server, ipad):
    base, tokens, root = server
    page = ipad
    assert page.goto(f"{base}/").status == 401
    page.goto(f"{base}/?token={tokens.viewer}")
    assert "token=" not in page.url  # the token went into the cookie
    assert page.context.cookies()[0]["httpOnly"] is True
    page.click("text=shoot")
    page.wait_for_selector("#job-1 img")
    page.wait_for_function("() => document.querySelector('#job-1 img').complete")
    assert page.eval_on_selector("#job-1 img", "img => img.naturalWidth") == 256

    page.tap("#job-2 .pick")
    page.wait_for_function("() => document.querySelector('#job-2').classList.contains('picked')")
    page.tap("#job-5 .pick")
    page.wait_for_function("() => document.querySelector('#job-5').classList.contains('picked')")
    assert read_picks(root / "shoot" / "picks.txt") == [2, 5]

    page.once("dialog", lambda d: d.accept("client likes this"))
    page.tap("#job-5 .notebtn")
    page.wait_for_function("() => document.querySelector('#job-5 .note').textContent === 'client likes this'")
    assert read_pick_notes(root / "shoot" / "picks.txt") == {5: "client likes this"}

    page.reload()
    assert picked(page) == [2, 5]
    assert page.inner_text("#job-5 .note") == "client likes this"

    # the full image opens in the lightbox on a tap; filters hide cards
    page.tap("#job-3 img")
    page.wait_for_selector("#lightbox img", state="visible")
    assert "kind=images" in page.get_attribute("#lightbox img", "src")
    page.tap("#lightbox .close")
    page.select_option("#filter-picked", "picked")
    assert page.eval_on_selector_all("#cards .card:not([hidden])", "cs => cs.length") == 2

    # compare two images side by side; a pick there lands in picks.txt too
    page.select_option("#filter-picked", "")
    page.check("#job-1 .cmp input")
    page.check("#job-3 .cmp input")
    page.tap("#compare")
    page.wait_for_url("**/compare?**")
    assert page.eval_on_selector_all(".compare .card", "cs => cs.map(c => Number(c.dataset.index))") == [1, 3]
    page.tap(".compare [data-index='3'] .pick")
    page.wait_for_function("() => document.querySelector(\".compare [data-index='3']\").classList.contains('picked')")
    assert read_picks(root / "shoot" / "picks.txt") == [2, 3, 5]
    # no horizontal scrolling at the tablet width
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
