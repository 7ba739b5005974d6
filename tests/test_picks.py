"""Pick lists: command-line arguments, picks.txt reading and atomic writing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagegen.errors import InputError
from imagegen.picks import format_picks, format_ranges, parse_pick_args, read_picks, write_picks

RUN = range(1, 1001)  # a run of 1000 jobs


def test_parse_single_indices_ranges_and_commas():
    assert parse_pick_args(["12", "57", "203-210"], RUN) == [12, 57, *range(203, 211)]
    assert parse_pick_args(["12,13", "13", " 14 "], RUN) == [12, 13, 14]
    assert parse_pick_args(["1000", "1-1"], RUN) == [1, 1000]
    assert parse_pick_args([], RUN) == []


def test_parse_job_ids_when_given():
    assert parse_pick_args(["5", "abc123"], RUN, ids={"abc123": 42}) == [5, 42]


def test_unknown_index_names_the_valid_range_and_returns_nothing():
    with pytest.raises(InputError) as err:
        parse_pick_args(["12", "1203"], RUN)
    assert err.value.message == "pick: 1203 is not a job index; this run has 1-1000"
    assert err.value.exit_code == 2


def test_unknown_indices_in_a_range_and_a_gappy_run():
    with pytest.raises(InputError, match=r"^pick: 999-1002 are not job indices; this run has 1-998, 1003-1010$"):
        parse_pick_args(["995-1002"], [*range(1, 999), *range(1003, 1011)])
    with pytest.raises(InputError, match="this run has no jobs"):
        parse_pick_args(["1"], [])


@pytest.mark.parametrize(
    ("arg", "reason"),
    [
        ("abc", "'abc' is not a job index or range"),
        ("-5", "'-5' is not a job index or range"),
        ("3.5", "'3.5' is not a job index or range"),
        ("10-3", "range '10-3' runs backwards; write 3-10"),
        ("1-99999999", "longer than 1,000,000"),
    ],
)
def test_malformed_arguments(arg, reason):
    with pytest.raises(InputError, match="^pick: ") as err:
        parse_pick_args(["1", arg], RUN)
    assert reason in err.value.message


def test_read_picks_comments_blank_lines_and_ranges(tmp_path):
    path = tmp_path / "picks.txt"
    path.write_text("# my favourites\n\n12\n  57   # the red one\n203-205\n7, 8\n12\n", encoding="utf-8")
    assert read_picks(path) == [7, 8, 12, 57, 203, 204, 205]


def test_read_picks_missing_file_is_empty(tmp_path):
    assert read_picks(tmp_path / "picks.txt") == []


def test_read_picks_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "picks.txt"
    path.write_text("12\n# ok\nbanana\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_picks(path)
    assert err.value.message == f"{path}:3: 'banana' is not a job index or range (use 12, 203-210 or 12,13)"


def test_read_picks_not_utf8(tmp_path):
    path = tmp_path / "picks.txt"
    path.write_bytes(b"12\n\xff\xfe\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_picks(path)


def test_write_picks_sorted_unique_with_header_and_atomic(tmp_path):
    path = tmp_path / "picks.txt"
    path.write_text("old content\n", encoding="utf-8")
    write_picks(path, [57, 12, 57, 3], header="picks for demo\nsecond line")
    assert path.read_text(encoding="utf-8") == "# picks for demo\n# second line\n3\n12\n57\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picks.txt"]  # no temp file left
    assert read_picks(path) == [3, 12, 57]


def test_write_picks_empty(tmp_path):
    write_picks(tmp_path / "picks.txt", [])
    assert (tmp_path / "picks.txt").read_text() == ""
    assert read_picks(tmp_path / "picks.txt") == []


def test_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    import imagegen.fsutil as fsutil

    path = tmp_path / "picks.txt"
    write_picks(path, [1, 2])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_picks(path, [5])
    assert read_picks(path) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picks.txt"]


def test_format_ranges():
    assert format_ranges([5, 1, 2, 3, 9, 10]) == "1-3, 5, 9-10"
    assert format_ranges(range(0, 100, 2), limit=3) == "0, 2, 4, ..."


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=60), st.text(max_size=30))
def test_format_then_read_round_trips(tmp_path_factory, indices, header):
    path = tmp_path_factory.mktemp("picks") / "picks.txt"
    path.write_text(format_picks(indices, header=header), encoding="utf-8")
    assert read_picks(path) == sorted(set(indices))
