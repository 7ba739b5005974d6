"""Thumbnails and contact-sheet pages: sizes, caps, sections, X/Y grids, atomic writes.

Cells are found on a page by colour: every job's thumbnail is one flat colour from a
well-separated palette, so a page's layout can be checked without reading any text.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.errors import InputError
from imagegen.sheets import SheetItem, write_sheets
from imagegen.sheets.layout import GAP, MARGIN, ROW_LABEL_WIDTH
from imagegen.thumbs import THUMB_SIZE, make_thumbnail, save_thumbnail_atomic

# Flat colours far from each other and from the page's white, greys and band blue.
LEVELS = (20, 95, 170, 245)
PALETTE = [c for c in itertools.product(LEVELS, repeat=3) if min(c) < 150 and not (max(c) - min(c) < 60)]


def make_items(folder: Path, axes_list: list[dict[str, str]], *, sizes=None) -> list[SheetItem]:
    """Items 1..n with a thumbnail of one palette colour each; the PNGs are never created."""
    items = []
    for i, axes in enumerate(axes_list, start=1):
        job = f"j{i:03d}"
        thumb = folder / "thumbs" / f"{i:04d}-{job}.jpg"
        size = sizes[i - 1] if sizes else (64, 64)
        save_thumbnail_atomic(make_thumbnail(Image.new("RGB", size, PALETTE[(i - 1) % len(PALETTE)])), thumb)
        items.append(SheetItem(i, job, thumb, folder / "images" / f"{i:04d}-{job}.png", dict(axes)))
    return items


def locate(page_path: Path, items: list[SheetItem]) -> dict[int, tuple[int, int, int]]:
    """Job index -> (centre x, centre y, area) of its thumbnail's colour on the page.

    Centres are rounded to 10 px, which absorbs JPEG ringing at the edges of cells. One
    pass over the page: each pixel is snapped to the palette grid or dropped.
    """
    page = np.asarray(Image.open(page_path).convert("RGB")).astype(np.int16)
    levels = np.array(LEVELS, dtype=np.int16)
    nearest = np.abs(page[..., None] - levels).argmin(axis=3)  # level number per channel
    close = (np.abs(page - levels[nearest]) <= 14).all(axis=2)
    code = np.where(close, nearest[..., 0] * 16 + nearest[..., 1] * 4 + nearest[..., 2], 64).ravel()
    ys, xs = np.indices(page.shape[:2])
    area = np.bincount(code, minlength=65)
    sum_x = np.bincount(code, weights=xs.ravel(), minlength=65)
    sum_y = np.bincount(code, weights=ys.ravel(), minlength=65)
    found = {}
    for item in items:
        r, g, b = (LEVELS.index(v) for v in PALETTE[(item.index - 1) % len(PALETTE)])
        k = r * 16 + g * 4 + b
        if area[k] < 0.25 * THUMB_SIZE * THUMB_SIZE:
            continue
        found[item.index] = (int(round(sum_x[k] / area[k], -1)), int(round(sum_y[k] / area[k], -1)), int(area[k]))
    return found


def page_pixels(path: Path) -> int:
    with Image.open(path) as im:
        return im.width * im.height


# --- thumbnails ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "mode", "expected"),
    [((1024, 768), "RGB", (256, 192)), ((300, 900), "RGBA", (85, 256)), ((64, 64), "L", (256, 256)),
     ((1024, 1024), "P", (256, 256)), ((2000, 10), "RGB", (256, 1))],
)
def test_thumbnail_long_side_is_256_and_rgb(size, mode, expected):
    thumb = make_thumbnail(Image.new(mode, size))
    assert thumb.size == expected
    assert thumb.mode == "RGB"
    assert make_thumbnail(Image.new(mode, size), size=100).size[expected.index(256)] == 100


def test_thumbnail_flattens_transparency_on_white():
    image = Image.new("RGBA", (512, 512), (255, 0, 0, 0))
    assert make_thumbnail(image).getpixel((10, 10)) == (255, 255, 255)


def test_save_thumbnail_atomic_writes_jpeg_and_leaves_no_temp(tmp_path):
    path = tmp_path / "thumbs" / "0001-abc.jpg"  # the folder does not exist yet
    save_thumbnail_atomic(make_thumbnail(Image.new("RGB", (1024, 512), (200, 10, 10))), path)
    save_thumbnail_atomic(make_thumbnail(Image.new("RGBA", (512, 1024), (10, 200, 10, 255))), path)
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (128, 256)
        assert im.getpixel((64, 128))[1] > 180
    assert [p.name for p in path.parent.iterdir()] == ["0001-abc.jpg"]


def test_save_thumbnail_failure_leaves_nothing(tmp_path):
    class Broken:
        mode = "RGB"

        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_thumbnail_atomic(Broken(), tmp_path / "0001-x.jpg")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --- pages ---------------------------------------------------------------------------------


def test_pages_capped_in_images_and_ordered_by_index(tmp_path):
    items = make_items(tmp_path, [{"seed": str(1000 + i)} for i in range(30)])
    out = tmp_path / "sheets"
    paths = write_sheets(items, out, title="caps", max_per_page=12)
    assert [p.name for p in paths] == [f"sheet-0{n}.jpg" for n in range(1, len(paths) + 1)]
    assert len(paths) >= 3
    seen: list[int] = []
    for path in paths:
        boxes = locate(path, items)
        assert 0 < len(boxes) <= 12
        # row-major reading order follows the job index
        order = sorted(boxes, key=lambda i: (boxes[i][1], boxes[i][0]))
        assert order == sorted(boxes)
        for _, _, area in boxes.values():
            assert abs(area - THUMB_SIZE * THUMB_SIZE) < 0.03 * THUMB_SIZE * THUMB_SIZE
        seen += order
    assert seen == list(range(1, 31))
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in paths]  # no temp files


def test_pages_capped_in_megapixels(tmp_path):
    items = make_items(tmp_path, [{"seed": str(i)} for i in range(40)])
    paths = write_sheets(items, tmp_path / "sheets", title="mp", max_megapixels=1.5)
    assert len(paths) > 1
    assert all(page_pixels(p) <= 1_500_000 for p in paths)
    assert sorted(i for p in paths for i in locate(p, items)) == list(range(1, 41))


def test_default_page_is_legible_and_square_ish(tmp_path):
    items = make_items(tmp_path, [{"seed": str(i)} for i in range(100)])
    [path] = write_sheets(items, tmp_path / "sheets", title="hundred")
    with Image.open(path) as im:
        assert im.format == "JPEG"
        assert page_pixels(path) <= 40_000_000
        assert 0.5 < im.width / im.height < 2
    assert len(locate(path, items[:50])) == 50  # colours repeat after 54 jobs


def test_stale_pages_from_a_bigger_run_are_removed(tmp_path):
    out = tmp_path / "sheets"
    out.mkdir()
    for name in ("sheet-02.jpg", "sheet-07.jpg", "sheet-100.jpg", "notes.txt", "index.html"):
        (out / name).write_bytes(b"old")
    items = make_items(tmp_path, [{"seed": str(i)} for i in range(5)])
    paths = write_sheets(items, out, title="stale")
    assert [p.name for p in paths] == ["sheet-01.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "notes.txt", "sheet-01.jpg"]
    assert write_sheets([], out, title="nothing yet") == []
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "notes.txt"]


def test_by_axis_makes_a_section_per_value(tmp_path):
    # Indices interleave the prompts; sections must gather them.
    axes = [{"prompt": f"#{p} {'<long> & prompt ' * p}", "seed": str(s)} for s in range(6) for p in (1, 2, 3)]
    items = make_items(tmp_path, axes)
    paths = write_sheets(items, tmp_path / "sheets", title="by", by="prompt", max_per_page=100)
    assert len(paths) == 1
    boxes = locate(paths[0], items)
    assert len(boxes) == 18
    prompt_of = {item.index: item.axes["prompt"] for item in items}
    tops: dict[str, list[int]] = {}
    for index, box in boxes.items():
        tops.setdefault(prompt_of[index], []).append(box[1])
    sections = list(tops.values())
    # Sections follow one another down the page and never share a row.
    for upper, lower in zip(sections, sections[1:]):
        assert max(upper) < min(lower)
    assert len({t for ts in sections for t in ts}) == sum(len(set(ts)) for ts in sections)


def test_by_sections_split_across_pages(tmp_path):
    axes = [{"seed": str(s), "cfg": str(c)} for s in range(3) for c in range(8)]
    items = make_items(tmp_path, axes)
    paths = write_sheets(items, tmp_path / "sheets", title="by", by="seed", max_per_page=10)
    assert len(paths) >= 3
    counts = [len(locate(p, items)) for p in paths]
    assert all(c <= 10 for c in counts) and sum(counts) == 24


def test_xy_grid_places_cells_by_axis_values(tmp_path):
    axes = [
        {"cfg": cfg, "lora:foo": w, "seed": seed}
        for seed in ("1", "2") for w in ("0.4", "0.8") for cfg in ("3", "5", "7")
    ]
    items = make_items(tmp_path, axes, sizes=[(96, 64)] * 12)  # landscape thumbs: 256x171
    paths = write_sheets(items, tmp_path / "sheets", title="xy", x="cfg", y="lora:foo")
    assert len(paths) == 1
    with Image.open(paths[0]) as im:
        page = np.asarray(im.convert("L"))
        assert im.width == 2 * MARGIN + ROW_LABEL_WIDTH + 3 * THUMB_SIZE + 2 * GAP
    boxes = locate(paths[0], items)
    assert len(boxes) == 12
    by_index = {item.index: item for item in items}
    lefts = {by_index[i].axes["cfg"]: set() for i in boxes}
    for i, box in boxes.items():
        lefts[by_index[i].axes["cfg"]].add(box[0])
    assert all(len(v) == 1 for v in lefts.values())  # one column per cfg value
    assert min(lefts["3"]) < min(lefts["5"]) < min(lefts["7"])
    assert min(lefts["3"]) - THUMB_SIZE // 2 >= MARGIN + ROW_LABEL_WIDTH - 10  # room for the row labels
    for seed in ("1", "2"):  # one grid per seed: 0.4 row above 0.8 row
        top = {w: {boxes[i][1] for i in boxes if by_index[i].axes == {**by_index[i].axes, "seed": seed, "lora:foo": w}}
               for w in ("0.4", "0.8")}
        assert len(top["0.4"]) == 1 and len(top["0.8"]) == 1
        assert max(top["0.4"]) < min(top["0.8"])
    # Labels: ink left of each row, and above the first row of each grid.
    first = min(b[1] for b in boxes.values()) - THUMB_SIZE // 2  # top of the first thumbnail box
    row_label_area = page[first : first + THUMB_SIZE, MARGIN : MARGIN + ROW_LABEL_WIDTH - 10]
    column_left = min(lefts["3"]) - THUMB_SIZE // 2
    column_label_area = page[first - 40 : first - 2, column_left : column_left + THUMB_SIZE]
    assert (row_label_area < 100).sum() > 50
    assert (column_label_area < 100).sum() > 50


def test_xy_grid_wider_than_a_page_is_split_into_column_chunks(tmp_path):
    axes = [{"steps": str(s), "cfg": str(c)} for c in (3, 7) for s in range(10, 25)]
    items = make_items(tmp_path, axes)
    paths = write_sheets(items, tmp_path / "sheets", title="wide", x="steps", y="cfg", max_per_page=12)
    counts = [len(locate(p, items)) for p in paths]
    assert all(0 < c <= 12 for c in counts) and sum(counts) == 30
    for path in paths:
        with Image.open(path) as im:
            assert im.width <= 2 * MARGIN + ROW_LABEL_WIDTH + 12 * (THUMB_SIZE + GAP)


def test_x_only_puts_other_axes_on_rows(tmp_path):
    axes = [{"cfg": c, "seed": s} for s in ("1", "2", "3") for c in ("4", "8")]
    items = make_items(tmp_path, axes)
    [path] = write_sheets(items, tmp_path / "sheets", title="x only", x="cfg")
    boxes = locate(path, items)
    assert len({b[0] for b in boxes.values()}) == 2  # two columns
    assert len({b[1] for b in boxes.values()}) == 3  # one row per seed


def test_duplicate_cells_are_not_dropped(tmp_path):
    items = make_items(tmp_path, [{"cfg": "3", "seed": "1"}] * 2 + [{"cfg": "5", "seed": "1"}])
    paths = write_sheets(items, tmp_path / "sheets", title="dupes", x="cfg", y="seed")
    assert sorted(i for p in paths for i in locate(p, items)) == [1, 2, 3]


def test_unknown_axis_lists_the_axes(tmp_path):
    items = make_items(tmp_path, [{"cfg": "3", "seed": "1"}, {"cfg": "5", "seed": "2"}])
    with pytest.raises(InputError) as err:
        write_sheets(items, tmp_path / "sheets", title="t", x="cgf")
    assert err.value.message == "sheet --x: unknown axis 'cgf' (did you mean 'cfg'?); axes in this run: cfg, seed"
    with pytest.raises(InputError, match="^sheet --by: unknown axis 'zzz'; axes in this run: cfg, seed$"):
        write_sheets(items, tmp_path / "sheets", title="t", by="zzz")
    with pytest.raises(InputError, match="--x and --y are both 'cfg'"):
        write_sheets(items, tmp_path / "sheets", title="t", x="cfg", y="cfg")
    with pytest.raises(InputError, match="too small"):
        write_sheets(items, tmp_path / "sheets", title="t", max_megapixels=0.05)
    assert not (tmp_path / "sheets").exists()  # nothing written


def test_missing_thumbnail_gets_a_placeholder(tmp_path):
    items = make_items(tmp_path, [{"seed": "1"}, {"seed": "2"}, {"seed": "3"}])
    items[1].thumb.unlink()
    [path] = write_sheets(items, tmp_path / "sheets", title="gap")
    assert sorted(locate(path, items)) == [1, 3]


def test_sheets_never_open_the_full_images(tmp_path, monkeypatch):
    items = make_items(tmp_path, [{"seed": str(i)} for i in range(4)])
    opened: list[str] = []
    real_open = Image.open

    def spy(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    write_sheets(items, tmp_path / "sheets", title="thumbs only")
    assert opened and all("/thumbs/" in name for name in opened)


def test_long_prompt_legend_lists_every_variant_and_labels_show_what_differs(tmp_path):
    from imagegen.plan import prompt_labels
    from imagegen.recipe import PromptVariant
    from imagegen.sheets.drawing import wrap_legend
    from imagegen.sheets.layout import legend_lines

    times = ["dawn", "morning", "noon", "afternoon", "golden hour", "sunset", "dusk", "evening", "night",
             "midnight", "blue hour", "overcast day"]
    texts = [f"macro photo of a ceramic teapot on a wooden table, soft window light, {t}" for t in times]
    labels = prompt_labels([PromptVariant(0, i, t) for i, t in enumerate(texts)])
    # the words that differ survive in every label (they were cut off before: "#1 macro phot…")
    assert labels[0] == "#1 …dawn" and labels[11] == "#12 …overcast day"
    assert prompt_labels([PromptVariant(0, 0, "a short prompt")]) == ["#1 a short prompt"]
    items = make_items(tmp_path, [{"prompt": label, "seed": str(s)} for label in labels for s in (1, 2)])
    unwrapped = legend_lines(items, ["prompt", "seed"], "")
    legend = wrap_legend(unwrapped, 300)  # a narrow page: the prompt line must wrap, not be cut
    assert len(legend) > len(unwrapped)
    text = " ".join(legend)
    assert all(label in text for label in labels), legend  # #10, #11 and #12 too
    pages = write_sheets(items, tmp_path / "sheets", title="legend")
    assert len(pages) == 1 and Image.open(pages[0]).size[0] > 0
