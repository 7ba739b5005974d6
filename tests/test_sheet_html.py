"""The HTML index as text: escaping, relative links, no network, embedded data."""

from __future__ import annotations

import json
import re
from pathlib import Path

from imagegen.sheets import SheetItem, write_index_html

NASTY = "</script><script>alert('x')</script> & \"quoted\" <b>bold</b> {{DATA}} @@CARDS@@"


def items_for(run: Path, n: int = 3) -> list[SheetItem]:
    return [
        SheetItem(
            index=i,
            job_id=f"id{i}",
            thumb=run / "thumbs" / f"{i:04d}-id{i}.jpg",
            image=run / "images" / f"{i:04d}-id{i}.png",
            axes={"prompt": NASTY if i == 2 else f"#{i} a chair", "seed": str(i), "steps": "20"},
            picked=i == 3,
        )
        for i in range(1, n + 1)
    ]


def test_everything_is_escaped(tmp_path):
    path = write_index_html(items_for(tmp_path), tmp_path / "sheets", title="My <recipe> & \"co\"")
    text = path.read_text(encoding="utf-8")
    assert "alert('x')</script>" not in text
    assert "<b>bold</b>" not in text
    assert "&lt;/script&gt;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in text
    assert "<title>My &lt;recipe&gt; &amp; &quot;co&quot;</title>" in text
    # Placeholders inside user text are not expanded.
    assert text.count("@@CARDS@@") == 2  # once in the caption, once in the data
    # Exactly the template's own script elements.
    assert len(re.findall(r"<script\b", text)) == 2 and len(re.findall(r"</script>", text)) == 2


def test_embedded_data_round_trips(tmp_path):
    path = write_index_html(items_for(tmp_path), tmp_path / "sheets", title="t\nwith newline")
    text = path.read_text(encoding="utf-8")
    raw = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)
    data = json.loads(raw)
    assert [a["name"] for a in data["axes"]] == ["prompt", "seed"]  # steps does not vary
    assert data["axes"][0]["values"][1] == NASTY
    assert data["items"] == [[0, 0], [1, 1], [2, 2]]
    assert data["picked"] == [3]
    assert data["header"][0] == "imagegen picks: t with newline" and data["header"][1].startswith("page written ")  # + when, with which picks


def test_links_are_relative_and_nothing_is_remote(tmp_path):
    run = tmp_path / "my run #1"
    path = write_index_html(items_for(run), run / "sheets", title="links")
    text = path.read_text(encoding="utf-8")
    assert 'src="../thumbs/0001-id1.jpg"' in text
    assert 'href="../images/0001-id1.png"' in text
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert not re.search(r'(src|href)="(/|file:)', text)
    # Odd characters in file names are percent-encoded.
    odd = SheetItem(1, "x", run / "thumbs" / "a b#c.jpg", run / "images" / "a b#c.png", {})
    text = write_index_html([odd], run / "sheets", title="odd").read_text(encoding="utf-8")
    assert 'src="../thumbs/a%20b%23c.jpg"' in text


def test_every_item_has_a_card_in_index_order(tmp_path):
    items = items_for(tmp_path, 40)[::-1]
    text = write_index_html(items, tmp_path / "sheets", title="order").read_text(encoding="utf-8")
    assert [int(i) for i in re.findall(r'<figure class="card" data-index="(\d+)"', text)] == list(range(1, 41))


def test_empty_run_and_atomic_write(tmp_path):
    out = tmp_path / "sheets"
    text = write_index_html([], out, title="empty").read_text(encoding="utf-8")
    assert "No images yet." in text
    assert [p.name for p in out.iterdir()] == ["index.html"]


def test_links_to_the_sheet_pages(tmp_path):
    out = tmp_path / "sheets"
    out.mkdir()
    for name in ("sheet-10.jpg", "sheet-02.jpg", "sheet-01.jpg", "sheet-x.jpg"):
        (out / name).write_bytes(b"jpg")
    text = write_index_html(items_for(tmp_path), out, title="pages").read_text(encoding="utf-8")
    assert re.findall(r'<a href="(sheet-[^"]+)">(\d+)</a>', text) == [
        ("sheet-01.jpg", "1"), ("sheet-02.jpg", "2"), ("sheet-10.jpg", "3")
    ]
