"""Prompt variant syntax: a small, strict expander for the sd-dynamic-prompts notation.

Syntax
------
- ``{a|b|c}``: one of the alternatives. Alternatives nest: ``{red|{dark|light} blue}``.
- ``{2$$a|b|c}``: choose 2 *distinct* alternatives, as **combinations** (order as written, no
  repeats): ``a, b`` / ``a, c`` / ``b, c``. ``{1-2$$a|b|c}`` takes every size from 1 to 2.
  The default joiner is ``", "``; ``{2$$ and $$a|b|c}`` joins with `` and ``.
- ``__name__``: a wildcard, one option per line of ``<wildcards>/name.txt`` (blank lines and
  ``#`` comments skipped; a line may use the syntax above). Names may contain ``/`` for
  sub-folders.
- ``\\{``, ``\\}``, ``\\|``, ``\\$``, ``\\_`` and ``\\\\`` are literal characters.
  A1111's weight escapes ``\\(`` ``\\)`` ``\\[`` ``\\]`` pass through unchanged (the weight parser
  reads them after expansion); A1111's ``\\\\`` is written ``\\\\\\\\`` here.

Every template expands combinatorially (all variants, in a stable order); `sample_variants`
draws N of them reproducibly without enumerating the rest. Errors are `PromptSyntaxError` with
the column in the template.
"""

from __future__ import annotations

import functools
import math
import random
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

from imagegen.errors import InputError

MAX_ENUMERATE = 1_000_000  # variants one template may expand to before we refuse
MAX_DEPTH = 64  # nested `{` groups plus wildcard levels in one template
MAX_WILDCARD_BYTES = 8 << 20  # a wildcard file larger than this is refused before it is read
MAX_WILDCARD_LINES = 100_000  # options in one wildcard file


class PromptSyntaxError(InputError):
    """A template problem; `column` is 1-based within the template."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.column = column


# --- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    text: str

    def count(self) -> int:
        return 1

    def nth(self, i: int) -> str:
        return self.text


@dataclass(frozen=True)
class _Seq:
    parts: tuple["_Node", ...]

    def count(self) -> int:
        return math.prod(p.count() for p in self.parts)

    def nth_list(self, i: int) -> list[str]:
        # Mixed radix, last part fastest, so variants read in the order they are written.
        out = []
        for part in reversed(self.parts):
            n = part.count()
            out.append(part.nth(i % n))
            i //= n
        return list(reversed(out))

    def nth(self, i: int) -> str:
        return "".join(self.nth_list(i))


@dataclass(frozen=True)
class _Alt:
    options: tuple["_Node", ...]

    def count(self) -> int:
        return sum(o.count() for o in self.options)

    def nth(self, i: int) -> str:
        for o in self.options:
            n = o.count()
            if i < n:
                return o.nth(i)
            i -= n
        raise IndexError(i)


@dataclass(frozen=True)
class _Choose:
    """k distinct options as combinations in written order (for each k in `sizes`), joined.

    Order: sizes ascending; within a size, combinations in lexicographic order of option
    positions; within a combination, the options' own variants in mixed radix (last fastest).
    Counting and `nth` use the elementary symmetric sums of the options' counts (a table of
    len(options) x max(sizes) numbers), so `{8$$...60 options...}` (2.5 billion variants) is
    counted and indexed at once, without walking its combinations."""

    sizes: tuple[int, ...]
    joiner: str
    options: tuple["_Node", ...]

    @functools.cached_property
    def _table(self) -> list[list[int]]:
        # e[j][k]: total weight of the k-combinations of options j.. (weight = product of counts)
        counts = [o.count() for o in self.options]
        n, kmax = len(counts), max(self.sizes)
        e = [[0] * (kmax + 1) for _ in range(n + 1)]
        for j in range(n, -1, -1):
            e[j][0] = 1
            if j < n:
                for k in range(1, kmax + 1):
                    e[j][k] = e[j + 1][k] + counts[j] * e[j + 1][k - 1]
        return e

    def count(self) -> int:
        return sum(self._table[0][k] for k in self.sizes)

    def _find(self, start: int, k: int, t: int) -> tuple[list[int], int]:
        """The k-combination (from options start..) holding weighted position t, and t's
        offset inside that combination's block of variants."""
        if k == 0:
            return [], t
        e = self._table
        for j in range(start, len(self.options)):
            c = self.options[j].count()
            block = c * e[j + 1][k - 1]
            if t < block:
                rest, offset = self._find(j + 1, k - 1, t // c)
                return [j, *rest], c * offset + t % c
            t -= block
        raise IndexError(t)

    def nth(self, i: int) -> str:
        for k in self.sizes:
            n = self._table[0][k]
            if i < n:
                combo, offset = self._find(0, k, i)
                # offset is mixed radix with the first chosen option most significant
                return self.joiner.join(_Seq(tuple(self.options[j] for j in combo)).nth_list(offset))
            i -= n
        raise IndexError(i)


_Node = Union[_Text, _Seq, _Alt, _Choose]

# --- the parser -----------------------------------------------------------------------------

_ESCAPABLE = set("{}|$_\\")
_A1111_ESCAPES = set("()[]")  # `\(` etc. belong to the A1111 weight syntax parsed after expansion
_WILDCARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-./]*")
_CHOOSE_HEAD = re.compile(r"\s*(\d+)(?:\s*-\s*(\d+))?\s*\$\$")

WildcardLoader = Callable[[str], Sequence[str]]


class _Parser:
    def __init__(self, text: str, wildcards: WildcardLoader | None, stack: tuple[str, ...]) -> None:
        self.s = text
        self.i = 0
        self.wildcards = wildcards
        self.stack = stack
        self.depth = len(stack)  # wildcard levels count towards the nesting limit

    def fail(self, message: str, at: int | None = None) -> PromptSyntaxError:
        col = (self.i if at is None else at) + 1
        return PromptSyntaxError(f"{message} (column {col} of the template)", col)

    def parse(self) -> _Node:
        node = self.sequence(top=True)
        if self.i < len(self.s):  # a stray '}' or '|'
            ch = self.s[self.i]
            if ch == "}":
                raise self.fail("unbalanced `}`: no `{` opens it")
            raise self.fail("`|` outside braces; write `\\|` for a literal bar")
        return node

    def sequence(self, top: bool = False) -> _Node:
        parts: list[_Node] = []
        buf: list[str] = []

        def flush() -> None:
            if buf:
                parts.append(_Text("".join(buf)))
                buf.clear()

        while self.i < len(self.s):
            ch = self.s[self.i]
            if ch == "\\":
                nxt = self.s[self.i + 1] if self.i + 1 < len(self.s) else ""
                if nxt in _A1111_ESCAPES:  # for the A1111 weight parser, after expansion: kept as written
                    buf.append(ch + nxt)
                    self.i += 2
                    continue
                if nxt not in _ESCAPABLE:
                    raise self.fail("`\\` escapes only `{ } | $ _ \\` (and passes A1111's `\\( \\) \\[ \\]` on)")
                buf.append(nxt)
                self.i += 2
            elif ch == "{":
                flush()
                parts.append(self.group())
            elif ch in "}|":
                if top and ch == "|":
                    raise self.fail("`|` outside braces; write `\\|` for a literal bar")
                break
            elif self.s.startswith("__", self.i):
                flush()
                parts.append(self.wildcard())
            else:
                buf.append(ch)
                self.i += 1
        flush()
        if not parts:
            return _Text("")
        return parts[0] if len(parts) == 1 else _Seq(tuple(parts))

    def group(self) -> _Node:
        start = self.i
        if self.depth >= MAX_DEPTH:
            raise self.fail(f"groups nest more than {MAX_DEPTH} deep", start)
        self.depth += 1
        try:
            return self._group(start)
        finally:
            self.depth -= 1

    def _group(self, start: int) -> _Node:
        self.i += 1  # '{'
        sizes: tuple[int, ...] | None = None
        joiner = ", "
        m = _CHOOSE_HEAD.match(self.s, self.i)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            if lo < 0 or hi < lo:
                raise self.fail(f"bad choice count `{m.group(0).strip()}`: want N$$ or N-M$$ with N <= M", start)
            sizes = tuple(range(lo, hi + 1))
            self.i = m.end()
            # an optional custom joiner: everything up to the next unescaped `$$`
            end = self._find_joiner_end()
            if end is not None:
                joiner = self.s[self.i : end].replace("\\$", "$")
                self.i = end + 2
        options: list[_Node] = []
        while True:
            opt_start = self.i
            options.append(self.sequence())
            if self.i >= len(self.s):
                raise self.fail("unbalanced `{`: no `}` closes it", start)
            ch = self.s[self.i]
            self.i += 1
            if ch == "}":
                break
            if ch != "|":  # pragma: no cover - sequence() stops only at } or |
                raise self.fail("unexpected character", opt_start)
        if sizes is None:
            if len(options) == 1 and isinstance(options[0], _Text) and options[0].text == "":
                raise self.fail("empty option list `{}`", start)
            return _Alt(tuple(options))
        if any(isinstance(o, _Text) and o.text == "" for o in options):
            raise self.fail("empty option in a choose-k group", start)
        if sizes[-1] > len(options):
            raise self.fail(f"cannot choose {sizes[-1]} of {len(options)} options", start)
        return _Choose(sizes, joiner, tuple(options))

    def _find_joiner_end(self) -> int | None:
        j = self.i
        while j < len(self.s):
            if self.s[j] == "\\":
                j += 2
                continue
            if self.s[j] in "{}|":
                return None
            if self.s.startswith("$$", j):
                return j
            j += 1
        return None

    def wildcard(self) -> _Node:
        start = self.i
        end = self.s.find("__", self.i + 2)
        name = self.s[self.i + 2 : end] if end >= 0 else ""
        if end < 0 or not _WILDCARD_NAME.fullmatch(name):
            raise self.fail("`__` starts a wildcard but no `__name__` follows; write `\\_\\_` for literal underscores", start)
        self.i = end + 2
        if self.wildcards is None:
            raise self.fail(f"wildcard `__{name}__` used but no `wildcards` folder is set", start)
        if name in self.stack:
            raise self.fail(f"wildcard `__{name}__` includes itself ({' -> '.join(self.stack + (name,))})", start)
        lines = self.wildcards(name)
        options = []
        for n, line in enumerate(lines, 1):
            try:
                options.append(_Parser(line, self.wildcards, self.stack + (name,)).parse())
            except PromptSyntaxError as exc:
                raise self.fail(f"in wildcard `{name}.txt` line {n}: {exc.message}", start) from None
        if not options:
            raise self.fail(f"wildcard file `{name}.txt` has no options", start)
        return _Alt(tuple(options))


# --- public API -----------------------------------------------------------------------------


def folder_wildcards(folder: Path) -> WildcardLoader:
    """A loader reading `<folder>/<name>.txt`; raises InputError when the file is missing."""

    root = folder.resolve()
    cache: dict[str, list[str]] = {}

    def load(name: str) -> list[str]:
        if name not in cache:
            cache[name] = _load(name)
        return cache[name]

    def _load(name: str) -> list[str]:
        path = folder / f"{name}.txt"
        # The name resolves inside the wildcards folder only (no `..`, no symlink out of it).
        if ".." in name.split("/") or not path.resolve().is_relative_to(root):
            raise InputError(f"wildcard `__{name}__` points outside the wildcards folder `{folder}`")
        try:
            st = path.stat()
        except FileNotFoundError:
            raise InputError(f"wildcard file `{path}` does not exist") from None
        except OSError as exc:
            raise InputError(f"cannot read wildcard file `{path}`: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never ends
            raise InputError(f"wildcard `{path}` is not a regular file")
        if st.st_size > MAX_WILDCARD_BYTES:
            raise InputError(f"wildcard file `{path}` is {st.st_size >> 20} MB; at most {MAX_WILDCARD_BYTES >> 20} MB")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_WILDCARD_BYTES + 1)
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read wildcard file `{path}`: {exc}") from None
        if len(data) > MAX_WILDCARD_BYTES:
            raise InputError(f"wildcard file `{path}` grew past {MAX_WILDCARD_BYTES >> 20} MB while being read")
        out = []
        for raw in text.splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                out.append(line)
        if len(out) > MAX_WILDCARD_LINES:
            raise InputError(f"wildcard file `{path}` has {len(out)} options; at most {MAX_WILDCARD_LINES}")
        return out

    return load


def parse_template(template: str, wildcards: WildcardLoader | None = None) -> "_Node":
    """Parse a template; raises PromptSyntaxError (with a column) or InputError (wildcard file)."""
    try:
        return _Parser(template, wildcards, ()).parse()
    except PromptSyntaxError:
        raise
    except InputError as exc:  # a missing wildcard file: point at the template start
        raise PromptSyntaxError(exc.message, 1) from None


def count_variants(template: str, wildcards: WildcardLoader | None = None) -> int:
    """How many variants `template` expands to."""
    return parse_template(template, wildcards).count()


def expand(template: str, wildcards: WildcardLoader | None = None) -> list[str]:
    """Every variant of `template`, in a stable order; raises PromptSyntaxError if more than
    MAX_ENUMERATE (use `sample_variants`)."""
    node = parse_template(template, wildcards)
    n = node.count()
    if n > MAX_ENUMERATE:
        raise PromptSyntaxError(f"expands to {n} variants (more than {MAX_ENUMERATE}); use `sample`", 1)
    return [node.nth(i) for i in range(n)]


def sample_variants(template: str, n: int, seed: int, wildcards: WildcardLoader | None = None) -> list[str]:
    """`n` distinct variants drawn reproducibly with `seed`, in expansion order.

    Raises PromptSyntaxError when the template has fewer than `n` variants."""
    node = parse_template(template, wildcards)
    total = node.count()
    if n > total:
        raise PromptSyntaxError(f"`sample: {n}` asks for more variants than the template has ({total})", 1)
    picks = sorted(random.Random(seed).sample(range(total), n))
    return [node.nth(i) for i in picks]
