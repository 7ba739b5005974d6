"""sheets/index.html in a real headless browser (Debian's chromium, driven by playwright).

Skipped with a reason when playwright or chromium is missing; with IMAGEGEN_REQUIRE_BROWSER=1
(set by CI) a missing browser fails instead. Playwright drives the system chromium: it never
downloads a browser of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from imagegen.picks import format_picks, read_picks
from imagegen.sheets import SheetItem, write_index_html
from imagegen.thumbs import make_thumbnail, save_thumbnail_atomic

REQUIRE = os.environ.get("IMAGEGEN_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NASTY = "<img src=x onerror=\"window.pwned=1\"> & 'quotes' </script>"
TITLE = "browser <test> & co"


def _chromium() -> str | None:
    for candidate in (os.environ.get("IMAGEGEN_CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason}, and IMAGEGEN_REQUIRE_BROWSER=1 says the browser test must run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    executable = _chromium()
    if executable is None:
        _unavailable("no chromium found (bash .ci/install-browser.sh, or set IMAGEGEN_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)  # generous: a busy 2-core CI machine is slow, and waits end on events, not time
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs  # type: ignore[attr-defined]
    yield page
    context.close()


def make_run(run: Path, n: int, *, files: bool = True) -> list[SheetItem]:
    """A run folder with n jobs over prompt x seed; thumbs and small PNGs unless files=False."""
    items = []
    for i in range(1, n + 1):
        thumb = run / "thumbs" / f"{i:04d}-job{i}.jpg"
        image = run / "images" / f"{i:04d}-job{i}.png"
        if files:
            picture = Image.new("RGB", (64, 64), (i * 40 % 256, 80, 160))
            save_thumbnail_atomic(make_thumbnail(picture), thumb)
            image.parent.mkdir(parents=True, exist_ok=True)
            picture.save(image)
        prompt = NASTY if i % 3 == 0 else f"#{i % 3} a red chair"
        axes = {"prompt": prompt, "seed": str(100 + i % 4), "steps": "20"}
        items.append(SheetItem(i, f"job{i}", thumb, image, axes, picked=i in (3, 7)))
    return items


def visible_indices(page) -> list[int]:
    return page.eval_on_selector_all(
        "#cards .card", "cards => cards.filter(c => !c.hidden).map(c => Number(c.dataset.index))"
    )


def test_toggle_picks_and_export_copy_and_download(page, tmp_path):
    items = make_run(tmp_path, 12)
    index = write_index_html(items, tmp_path / "sheets", title=TITLE)
    page.goto(index.as_uri())

    # Initial picks come from the items; the thumbnails load through relative links.
    assert page.eval_on_selector_all(".card.picked", "cs => cs.map(c => Number(c.dataset.index))") == [3, 7]
    page.wait_for_function("document.querySelector('#job-1 img').complete")
    assert page.eval_on_selector("#job-1 img", "img => img.naturalWidth") == 256

    for index_no in (5, 12, 3):  # pick 5 and 12, unpick 3
        page.click(f"#job-{index_no} .pick")
    exported = page.input_value("#picklist")
    page_line = exported.splitlines()[1]  # the page's write time and picks, for `pick --from`
    assert page_line.startswith("# page written ") and page_line.endswith("with picks: 3, 7")
    expected = format_picks([5, 7, 12], header=f"imagegen picks: {TITLE}\n{page_line}")
    assert exported == expected
    assert page.get_attribute("#job-5 .pick", "aria-pressed") == "true"
    assert page.get_attribute("#job-3 .pick", "aria-pressed") == "false"
    assert "3 picked" in page.inner_text("#count")

    page.click("#copy")
    assert page.get_attribute("#copy", "data-copied") == expected
    page.wait_for_function("document.getElementById('status').textContent.length > 0")

    with page.expect_download() as info:
        page.click("#download")
    download = info.value
    assert download.suggested_filename == "picks.txt"
    saved = tmp_path / "downloaded-picks.txt"
    download.save_as(saved)
    assert saved.read_text(encoding="utf-8") == expected
    assert read_picks(saved) == [5, 7, 12]


def test_filters_hide_non_matching_cards(page, tmp_path):
    items = make_run(tmp_path, 12, files=False)
    page.goto(write_index_html(items, tmp_path / "sheets", title=TITLE).as_uri())
    assert visible_indices(page) == list(range(1, 13))
    # One select per varying axis (steps is fixed), options in order of first appearance.
    assert page.eval_on_selector_all("#axis-filters select", "ss => ss.map(s => s.dataset.axis)") == ["prompt", "seed"]
    page.select_option('select[data-axis="seed"]', label="102")
    assert visible_indices(page) == [2, 6, 10]
    page.select_option('select[data-axis="prompt"]', label="#2 a red chair")
    assert visible_indices(page) == [2]
    page.select_option('select[data-axis="prompt"]', label=NASTY)
    assert visible_indices(page) == [6]
    page.select_option('select[data-axis="seed"]', value="")
    assert visible_indices(page) == [3, 6, 9, 12]
    page.select_option("#filter-picked", "picked")
    assert visible_indices(page) == [3]
    page.select_option('select[data-axis="prompt"]', value="")
    assert visible_indices(page) == [3, 7]
    page.select_option("#filter-picked", "unpicked")
    assert 3 not in visible_indices(page) and len(visible_indices(page)) == 10
    assert "showing 10 of 12" in page.inner_text("#count")


def test_prompts_are_shown_as_text_never_run(page, tmp_path):
    items = make_run(tmp_path, 6, files=False)
    page.goto(write_index_html(items, tmp_path / "sheets", title=TITLE).as_uri())
    assert page.title() == TITLE
    assert NASTY in page.inner_text("#job-3 .cap")
    assert page.evaluate("window.pwned") is None
    assert page.dialogs == []  # type: ignore[attr-defined]
    assert page.eval_on_selector_all("#cards img", "imgs => imgs.length") == 6  # no injected <img>


def test_click_opens_full_image_and_picks_survive_a_reload(page, tmp_path):
    items = make_run(tmp_path, 4)
    index = write_index_html(items, tmp_path / "sheets", title=TITLE)
    page.goto(index.as_uri())
    with page.expect_popup() as popup_info:
        page.click("#job-2 img")
    popup = popup_info.value
    assert popup.url == items[1].image.as_uri()
    popup.close()

    page.click("#job-1 .pick")
    page.reload()
    assert page.eval_on_selector_all(".card.picked", "cs => cs.map(c => Number(c.dataset.index))") == [1, 3]
    page.click("#reset")
    assert page.eval_on_selector_all(".card.picked", "cs => cs.map(c => Number(c.dataset.index))") == [3]

    # A new picks.txt (page rewritten with other initial picks) wins over the browser's memory.
    page.click("#job-4 .pick")
    write_index_html([dataclasses.replace(it, picked=it.index == 2) for it in items], index.parent, title=TITLE)
    page.reload()
    assert page.eval_on_selector_all(".card.picked", "cs => cs.map(c => Number(c.dataset.index))") == [2]


def test_works_from_a_static_server(page, tmp_path):
    items = make_run(tmp_path, 3)
    write_index_html(items, tmp_path / "sheets", title=TITLE)
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/sheets/index.html")
        page.wait_for_function("Array.from(document.images).every(img => img.complete)")
        assert page.eval_on_selector_all("#cards img", "imgs => imgs.map(i => i.naturalWidth)") == [256] * 3
        page.click("#job-2 .pick")
        assert page.input_value("#picklist").splitlines()[2:] == ["2", "3"]  # after the title and page lines
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (keep test output clean)
        pass


def test_a_thousand_items_filter_and_pick(page, tmp_path):
    items = make_run(tmp_path, 1000, files=False)
    index = write_index_html(items, tmp_path / "sheets", title=TITLE)
    # Speed is measured by bench/sheet.py, not here: a timed assertion fails on a busy machine.
    page.goto(index.as_uri())
    result = page.evaluate(
        """() => {
            const select = document.querySelector('select[data-axis="seed"]');
            select.value = "1"; select.dispatchEvent(new Event("change"));
            const shown = document.querySelectorAll("#cards .card:not([hidden])").length;
            document.querySelector("#job-500 .pick").click();
            return {shown: shown};
        }"""
    )
    assert result["shown"] == 250
    assert page.input_value("#picklist").splitlines()[2:] == ["3", "7", "500"]
