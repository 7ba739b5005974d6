"""Pick lists: the job indices a person keeps, as typed on the command line or in picks.txt,
and the one place that changes a run's picks (picks.txt plus the store's mirror table).

picks.txt holds one job index per line; ranges such as `203-210` (inclusive), blank lines
and `#` comments (whole-line or trailing) are allowed, so the file can be edited by hand.
picks.txt is the source of truth; `RunStore.set_picks` keeps the manifest's `picks` table
in step, and only this module calls it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from imagegen.errors import InputError
from imagegen.fsutil import locked, write_bytes_atomic
from imagegen.store import RunStore

MAX_RANGE = 1_000_000  # a range longer than this is a typo, not a pick
PICKS_LOCK = ".picks.lock"  # in the run folder: held while picks.txt changes
MAX_NOTE = 200  # characters of a pick note (`42  # note`); longer notes are cut
PICKS_HEADER = "imagegen picks: one job index per line (ranges like 12-15 and # comments allowed)"

_TOKEN = re.compile(r"^(\d+)(?:-(\d+))?$")
# A pick whose job left the recipe stays in picks.txt as this comment, and comes back as a
# pick when the job is planned again (same job id).
_ORPHAN = re.compile(r"^#\s*orphaned pick (\d+) \(job ([0-9a-f]{12})[^)]*\)(?::\s*(.*))?$")
Orphans = Mapping[str, tuple[int, str]]  # job id -> (index it had, note)
# index.html carries the picks it was written with; its export repeats this header line, so that
# `pick --from` can tell picks made on the command line since then from picks undone in the browser.
_PAGE = re.compile(r"^#\s*page written (\S+) \(t=(\d+(?:\.\d+)?)\) with picks: ?(.*)$")


def _parse_token(token: str, ids: Mapping[str, int] | None) -> range:
    """One index, range or job id -> a range of indices; raises ValueError with the reason."""
    match = _TOKEN.match(token)
    if match is None:
        if ids is not None and token in ids:
            index = ids[token]
            return range(index, index + 1)
        raise ValueError(f"{token!r} is not a job index or range (use 12, 203-210 or 12,13)")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) is not None else start
    if end < start:
        raise ValueError(f"range {token!r} runs backwards; write {end}-{start}")
    if end - start + 1 > MAX_RANGE:
        raise ValueError(f"range {token!r} is longer than {MAX_RANGE:,} indices")
    return range(start, end + 1)


def _parse_tokens(text: str, ids: Mapping[str, int] | None, where: str) -> set[int]:
    """Indices named by `12 57,58 203-210` (and job ids); InputError `where: reason` otherwise."""
    picked: set[int] = set()
    for token in re.split(r"[,\s]+", text.strip()):
        if not token:
            continue
        try:
            picked.update(_parse_token(token, ids))
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
    return picked


def format_ranges(indices: Iterable[int], *, limit: int = 6) -> str:
    """Compress indices into `1-5, 7, 9-12`, showing at most `limit` runs (then `...`)."""
    runs: list[tuple[int, int]] = []
    for index in sorted(set(indices)):
        if runs and index == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    if len(runs) > limit:
        parts.append("...")
    return ", ".join(parts)


def parse_pick_args(
    args: Sequence[str], valid: Collection[int], *, ids: Mapping[str, int] | None = None
) -> list[int]:
    """Parse `12`, `57`, `203-210`, `12,13` (and job ids found in `ids`) into sorted unique indices.

    Raises InputError for a malformed argument, or for indices not in `valid`; the message
    gives the run's valid range, e.g. `pick: 1203 is not a job index; this run has 1-1000`.
    """
    valid_set = valid if isinstance(valid, (set, frozenset)) else set(valid)
    picked: set[int] = set()
    for arg in args:
        picked |= _parse_tokens(arg, ids, "pick")
    unknown = sorted(picked - valid_set)
    if unknown:
        what = (
            f"{format_ranges(unknown)} is not a job index"
            if len(unknown) == 1
            else f"{format_ranges(unknown)} are not job indices"
        )
        have = f"this run has {format_ranges(valid_set)}" if valid_set else "this run has no jobs"
        raise InputError(f"pick: {what}; {have}")
    return sorted(picked)


def read_picks(path: Path, *, ids: Mapping[str, int] | None = None) -> list[int]:
    """Read a picks file into sorted unique indices; a missing file reads as no picks.

    Lines may hold an index, a range `3-7`, several separated by commas, or (when `ids` maps
    job ids to indices) a job id. Raises InputError `picks.txt:LINE: ...` for a malformed line
    or a file that is not UTF-8 text.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; expected one job index per line") from None
    picked: set[int] = set()
    for line_no, line in enumerate(text.splitlines(), start=1):
        picked |= _parse_tokens(line.split("#", 1)[0], ids, f"{path}:{line_no}")
    return sorted(picked)


def read_pick_notes(path: Path) -> dict[int, str]:
    """The trailing `# comments` people wrote after single indices (`42  # best light`), so that
    rewriting picks.txt keeps them. Lines that do not parse are skipped (read_picks reports them)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    notes: dict[int, str] = {}
    for line in text.splitlines():
        content, sep, comment = line.partition("#")
        if sep and comment.strip() and content.strip().isdigit():
            notes[int(content.strip())] = comment.strip()
    return notes


def read_orphans(path: Path) -> dict[str, tuple[int, str]]:
    """The `# orphaned pick 12 (job <id> ...)` comments of a picks file: job id -> (index, note)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        m = _ORPHAN.match(line.strip())
        if m:
            out[m.group(2)] = (int(m.group(1)), (m.group(3) or "").strip())
    return out


def format_picks(indices: Iterable[int], *, header: str | None = None, notes: Mapping[int, str] | None = None,
                 orphans: Orphans | None = None) -> str:
    """The text of a picks file: `# header` lines, the orphaned picks as comments, then one
    index per line, sorted and unique, each with its note (`42  # best light`) when `notes` has one."""
    lines = []
    if header:
        lines += [f"# {h}".rstrip() if not h.startswith("#") else h for h in header.splitlines()]
    for job_id, (index, note) in sorted((orphans or {}).items(), key=lambda kv: kv[1][0]):
        lines.append(f"# orphaned pick {index} (job {job_id}; no longer in the recipe, comes back if it is again)"
                     + (f": {note}" if note else ""))
    notes = notes or {}
    lines += [f"{index}  # {notes[index]}" if notes.get(index) else str(index) for index in sorted(set(indices))]
    return "\n".join(lines) + "\n" if lines else ""


def write_picks(path: Path, indices: Iterable[int], *, header: str | None = None,
                notes: Mapping[int, str] | None = None, orphans: Orphans | None = None) -> None:
    """Write `indices` (sorted, unique, one per line, with their `notes`) to `path` atomically,
    after `header` comments.

    Raises ValueError for a negative index and OSError if the file cannot be written.
    """
    indices = sorted(set(indices))
    if indices and indices[0] < 0:
        raise ValueError(f"job indices are never negative, got {indices[0]}")
    write_bytes_atomic(Path(path), format_picks(indices, header=header, notes=notes, orphans=orphans).encode("utf-8"))


# --- a run's picks ----------------------------------------------------------------------------


def page_header(picks: Iterable[int], written_at: float | None = None) -> str:
    """The line index.html carries (and exports): when it was written and with which picks."""
    t = time.time() if written_at is None else written_at
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))
    return f"page written {stamp} (t={t:.3f}) with picks: {format_ranges(picks, limit=10**9)}"


def read_page_picks(path: Path) -> tuple[str, set[int]] | None:
    """(when, picks) of the page a browser export came from, or None for a list without that line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        m = _PAGE.match(line.strip())
        if m:
            try:
                return m.group(1), _parse_tokens(m.group(3), None, str(path))
            except InputError:
                return None
    return None


def job_indices(store: RunStore) -> tuple[set[int], dict[str, int]]:
    """Valid pick targets: planned job indices, and job ids mapped to their index."""
    rows = store.rows()
    return {r.index for r in rows}, {r.id: r.index for r in rows}


def clean_note(note: str) -> str:
    """A pick note as picks.txt can hold it: one line, no control characters, at most
    MAX_NOTE characters."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in note).split())[:MAX_NOTE]


def update_picks(store: RunStore, args: Sequence[str] = (), *, from_file: Path | None = None, remove: bool = False,
                 clear: bool = False, notes: Mapping[int, str] | None = None,
                 on_warning: Callable[[str], None] = lambda message: None,
                 after: Callable[[list[int]], None] | None = None) -> list[int]:
    """Change the picks, write picks.txt atomically and mirror it into the manifest, all under
    the picks lock (`after(picks)`, e.g. refreshing index.html, runs under it too).

    `args` are added (or removed with `remove`); `from_file` (a list exported from index.html)
    *replaces* the picks, since it holds the whole set chosen in the browser, except that
    changes made on the command line since that page was written win: picks added since are
    kept and picks removed since stay removed, and `on_warning` says which; `clear` empties
    first. `notes` sets the note of these indices (an empty note removes it; kept as
    `42  # note` in picks.txt). Raises InputError (nothing written) for an index or id that is
    not in the run, or a `from_file` that is not a readable file."""
    with picks_lock(store):
        return _update_picks(store, args, from_file, remove, clear, notes, on_warning, after)


@contextlib.contextmanager
def picks_lock(store: RunStore) -> Iterator[None]:
    """Hold RUN/.picks.lock (an flock, blocking) while picks.txt is read, changed and written, so
    that concurrent changes (`imagegen pick`, the review server, a render remapping picks) are
    never lost. The sections it guards are short: waiting is fine."""
    with locked(store.folder / PICKS_LOCK):
        yield


def _update_picks(store: RunStore, args: Sequence[str], from_file: Path | None, remove: bool, clear: bool,
                  notes: Mapping[int, str] | None, on_warning: Callable[[str], None],
                  after: Callable[[list[int]], None] | None) -> list[int]:
    valid, ids = job_indices(store)
    chosen = parse_pick_args(list(args), valid, ids=ids) if args else []
    current = set(read_picks(store.picks_file, ids=ids))
    if from_file is not None:
        if not Path(from_file).is_file():
            raise InputError(f"pick --from: {from_file} is not a file")
        extra = set(read_picks(from_file, ids=ids))
        bad = sorted(extra - valid)
        if bad:
            parse_pick_args([str(bad[0])], valid)  # raises the standard message
        page = read_page_picks(from_file)
        if page is not None and not clear:
            when, seen = page
            added = sorted((current - seen) - extra)
            removed = sorted((seen - current) & extra)
            if added:
                on_warning(f"pick --from: kept {len(added)} picks made on the command line after the page was "
                           f"written ({when}), which the browser did not show: {format_ranges(added, limit=50)}")
            if removed:
                on_warning(f"pick --from: left out {len(removed)} picks removed on the command line after the page "
                           f"was written ({when}): {format_ranges(removed, limit=50)}")
            extra = (extra | set(added)) - set(removed)
        chosen = sorted(set(chosen) | extra)
    base = set() if clear or from_file is not None else current
    new = base - set(chosen) if remove else base | set(chosen)
    kept_notes = {**read_pick_notes(store.picks_file), **(read_pick_notes(from_file) if from_file is not None else {})}
    for index, note in (notes or {}).items():
        kept_notes[index] = clean_note(note)
    orphans = {} if clear else read_orphans(store.picks_file)
    write_picks(store.picks_file, sorted(new), header=PICKS_HEADER, notes=kept_notes, orphans=orphans)
    store.set_picks(sorted(new))
    if after is not None:
        after(sorted(new))
    return sorted(new)


def list_picks(store: RunStore) -> list[tuple[int, str, Path | None]]:
    """(index, job id, image path or None when not rendered yet) for each pick."""
    rows = {r.index: r for r in store.rows()}
    out = []
    for i in read_picks(store.picks_file):
        row = rows.get(i)
        if row is None:
            out.append((i, "?", None))
        else:
            out.append((i, row.id, store.folder / row.file if row.status == "done" and row.file else None))
    return out


def remap_picks(store: RunStore, old_ids: dict[int, str]) -> tuple[int, list[str]]:
    """After a recipe edit moved job indices: make picks.txt name the same jobs again.

    `old_ids` maps the indices picks.txt was written against to job ids. A pick whose job is no
    longer in the recipe is never dropped: it stays in picks.txt as an `# orphaned pick` comment
    (with its note) and becomes a pick again when that job is planned again. Returns (picks
    moved or restored, newly orphaned picks). A picks.txt with errors is left alone (the next
    `pick` reports them)."""
    with picks_lock(store):
        return _remap_picks(store, old_ids)


def _remap_picks(store: RunStore, old_ids: dict[int, str]) -> tuple[int, list[str]]:
    try:
        picks = read_picks(store.picks_file)
    except InputError:
        return 0, []
    orphans = read_orphans(store.picks_file)
    if not picks and not orphans:
        return 0, []
    new_index = {r.id: r.index for r in store.rows()}
    old_notes = read_pick_notes(store.picks_file)
    kept: list[int] = []
    notes: dict[int, str] = {}
    orphaned: list[str] = []
    moved = 0
    for i in picks:
        job_id = old_ids.get(i)
        if job_id is None or job_id in new_index:
            target = i if job_id is None else new_index[job_id]
            moved += target != i
            kept.append(target)
            if i in old_notes:
                notes[target] = old_notes[i]
        else:
            orphaned.append(f"{i} (job {job_id})")
            orphans = {**orphans, job_id: (i, old_notes.get(i, ""))}
    for job_id, (i, note) in list(orphans.items()):
        if job_id in new_index:  # planned again: a pick again
            orphans = {k: v for k, v in orphans.items() if k != job_id}
            kept.append(new_index[job_id])
            if note:
                notes[new_index[job_id]] = note
            moved += 1
    if moved or orphaned:
        write_picks(store.picks_file, kept, header=PICKS_HEADER, notes=notes, orphans=orphans)
        store.set_picks(sorted(set(kept)))
    return moved, orphaned
