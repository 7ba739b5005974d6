"""A1111 prompt syntax: emphasis weights, BREAK, `<lora:...>` tags, and the 75-token chunks
that CLIP sees. Pure Python (the CLIP tokenizer comes from the `tokenizers` library, loaded on
first use); the engine turns chunks into embeddings (`imagegen.engine.text`).

Behaviour follows AUTOMATIC1111's documented prompt syntax; the code is our own.

Weights (`parse_weights`)
-------------------------
- ``(text)`` multiplies the weight by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)``
  multiplies it by 1.3; nesting multiplies: ``(((house:1.3)))`` is 1.3 x 1.1 x 1.1.
- A bracket left open applies to the end of the prompt; a closing bracket with nothing open,
  and a ``:1.3)`` with no ``(`` open, are plain text.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters (a lone ``\\`` before
  anything else is dropped, as A1111 does).
- Adjacent runs with equal weights merge.
- Upper-case ``BREAK`` as a whole word ends the current chunk (it does so inside brackets too).

Chunks (`chunk_prompt`)
-----------------------
Tokens are cut into chunks of 75. When a chunk is full and its last comma is within its last
20 tokens, the tokens after that comma move to the next chunk. A textual-inversion embedding
(matched by the tokens of its name, like A1111) is never split across chunks. Each chunk is
later encoded as BOS + 75 + EOS.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from imagegen.errors import InputError

# --- defaults and names ----------------------------------------------------------------------
PROMPT_SYNTAXES = ("a1111", "plain")  # a1111: weights, BREAK, chunks; plain: text as written, <= 75 tokens
EMPHASES = ("original", "no-norm", "ignore")  # original: A1111's default (weights, then mean rescale)
DEFAULT_SYNTAX = "a1111"
DEFAULT_EMPHASIS = "original"
CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"
PAREN_UP = 1.1  # `(x)`
A1111_EMPHASIS_NAMES = {"original": "Original", "no-norm": "No norm", "ignore": "None"}  # infotext `Emphasis:`


class PromptWeightError(InputError):
    """A weighting problem A1111 also refuses (e.g. `(a:1.2.3)`), with the 1-based column."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class Run:
    """A stretch of prompt text with one weight; `is_break` marks a BREAK (text "")."""

    text: str
    weight: float = 1.0
    is_break: bool = False


BREAK = Run("", 1.0, True)
_BREAK_WORD = re.compile(r"\s*(?<!\w)BREAK(?!\w)\s*")
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = "\\()[]:"


def parse_weights(text: str) -> list[Run]:
    """The prompt as runs of (text, weight) and BREAKs, adjacent equal weights merged.

    Raises PromptWeightError for a weight that is not a number (`(a:1.2.3)`)."""
    runs: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def add_text(piece: str) -> None:
        parts = _BREAK_WORD.split(piece)
        for i, part in enumerate(parts):
            if i:
                runs.append(["", 1.0, True])
            if part:
                runs.append([part, 1.0, False])

    def scale(start: int, factor: float) -> None:
        for r in runs[start:]:
            if not r[2]:
                r[1] *= factor

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt and nxt in "()[]\\":
                runs.append([nxt, 1.0, False])
                i += 2
            else:
                i += 1  # a lone backslash is dropped
            continue
        if c == "(":
            round_open.append(len(runs))
            i += 1
            continue
        if c == "[":
            square_open.append(len(runs))
            i += 1
            continue
        if c == ":":
            m = _WEIGHT_CLOSE.match(text, i)
            if m and round_open:
                try:
                    factor = float(m.group(1))
                except ValueError:
                    raise PromptWeightError(f"weight `{m.group(1)}` is not a number", i + 2) from None
                scale(round_open.pop(), factor)
                i = m.end()
                continue
            if m:  # no `(` open: the whole `:1.3)` is text
                add_text(m.group(0))
                i = m.end()
                continue
            add_text(":")
            i += 1
            continue
        if c == ")" and round_open:
            scale(round_open.pop(), PAREN_UP)
            i += 1
            continue
        if c == "]" and square_open:
            scale(square_open.pop(), 1 / PAREN_UP)
            i += 1
            continue
        if c in ")]":
            add_text(c)
            i += 1
            continue
        j = i
        while j < n and text[j] not in _SPECIAL:
            j += 1
        add_text(text[i:j])
        i = j
    for start in reversed(round_open):
        scale(start, PAREN_UP)
    for start in reversed(square_open):
        scale(start, 1 / PAREN_UP)
    merged: list[Run] = []
    for t, w, b in runs:
        if merged and not b and not merged[-1].is_break and merged[-1].weight == w:
            merged[-1] = Run(merged[-1].text + t, w)
        else:
            merged.append(BREAK if b else Run(t, w))
    return merged or [Run("", 1.0)]


def has_weight_syntax(text: str) -> bool:
    """True when A1111 would read something in `text` differently from plain text."""
    runs = parse_weights(text)
    return len(runs) != 1 or runs[0].is_break or runs[0].text != text


def prompt_runs(text: str, syntax: str = DEFAULT_SYNTAX, emphasis: str = DEFAULT_EMPHASIS) -> list[Run]:
    """The runs the encoder sees: `parse_weights` for a1111 syntax, the text as one run for
    `plain` syntax or `emphasis: ignore` (brackets and BREAK stay text, as A1111's "None")."""
    if syntax == "plain" or emphasis == "ignore":
        return [Run(text, 1.0)]
    return parse_weights(text)


# --- extra-network tags: <lora:name:weight> ---------------------------------------------------

_TAG = re.compile(r"<(\w+):([^<>]*)>")


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float
    column: int  # 1-based


def extract_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """(text without its `<lora:name[:weight]>` tags, the tags). Whitespace a tag leaves
    behind is collapsed. Raises InputError for other extra networks (`<hypernet:...>`) or a
    tag we cannot apply (separate text-encoder / UNet weights, block weights)."""
    tags: list[LoraTag] = []
    for m in _TAG.finditer(text):
        kind, args = m.group(1).lower(), m.group(2).split(":")
        if kind not in ("lora", "lyco"):
            raise InputError(f"`<{m.group(1)}:...>` at column {m.start() + 1}: only `<lora:name:weight>` tags are supported")
        name = args[0].strip()
        if not name:
            raise InputError(f"`{m.group(0)}` at column {m.start() + 1}: the LoRA tag has no name")
        if len(args) > 2:
            raise InputError(f"`{m.group(0)}` at column {m.start() + 1}: separate text-encoder/UNet weights or block weights "
                             "are not supported; write `<lora:name:weight>`")
        try:
            weight = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise InputError(f"`{m.group(0)}` at column {m.start() + 1}: weight `{args[1]}` is not a number") from None
        if not math.isfinite(weight):
            raise InputError(f"`{m.group(0)}` at column {m.start() + 1}: weight must be finite")
        tags.append(LoraTag(name, weight, m.start() + 1))
    if not tags:
        return text, []
    stripped = _TAG.sub(" ", text)
    return " ".join(stripped.split()), tags


# --- chunks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """75 token ids (padded), one weight per token, and where embeddings go: (offset, name)."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    embeddings: tuple[tuple[int, str], ...] = ()

    def input_ids(self, bos: int, eos: int, pad_after_eos: int | None = None) -> list[int]:
        """BOS + tokens + EOS (77 ids); with `pad_after_eos`, every id after the first EOS
        becomes that id (OpenCLIP-G pads with 0)."""
        ids = [bos, *self.tokens, eos]
        if pad_after_eos is not None:
            first = ids.index(eos)
            ids[first + 1:] = [pad_after_eos] * (len(ids) - first - 1)
        return ids

    def multipliers(self) -> list[float]:
        """Weights for the 77 positions (BOS and EOS weigh 1)."""
        return [1.0, *self.weights, 1.0]


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding for chunking: the token ids of its name, its vector count."""

    name: str
    name_ids: tuple[int, ...]
    vectors: int


def chunk_prompt(runs: Sequence[Run], tokenize: Callable[[str], list[int]], *, eos: int, comma: int,
                 embeddings: Sequence[Embedding] = (), chunk_len: int = CHUNK_TOKENS,
                 backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Cut the runs into chunks (see the module docstring). `tokenize` gives the ids of a text
    without BOS/EOS; padding uses `eos`; `comma` is the id of ",". An embedding's placeholder
    ids are 0. Raises InputError for an embedding longer than a chunk."""
    by_first: dict[int, list[Embedding]] = {}
    for e in sorted(embeddings, key=lambda e: -len(e.name_ids)):
        if e.name_ids:
            by_first.setdefault(e.name_ids[0], []).append(e)
    chunks: list[Chunk] = []
    toks: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1

    def close() -> None:
        nonlocal toks, weights, fixes, last_comma
        pad = chunk_len - len(toks)
        chunks.append(Chunk(tuple(toks + [eos] * pad), tuple(weights + [1.0] * pad), tuple(fixes)))
        toks, weights, fixes, last_comma = [], [], [], -1

    for run in runs:
        if run.is_break:
            close()
            continue
        ids = tokenize(run.text) if run.text else []
        pos = 0
        while pos < len(ids):
            tok = ids[pos]
            emb = next((e for e in by_first.get(tok, ()) if tuple(ids[pos:pos + len(e.name_ids)]) == e.name_ids), None)
            if tok == comma and emb is None:
                last_comma = len(toks)
            elif len(toks) == chunk_len and last_comma != -1 and len(toks) - last_comma <= backtrack:
                keep = last_comma + 1
                moved = (toks[keep:], weights[keep:], [(o - keep, n) for o, n in fixes if o >= keep])
                toks, weights, fixes = toks[:keep], weights[:keep], [(o, n) for o, n in fixes if o < keep]
                close()
                toks, weights, fixes = moved
            if len(toks) == chunk_len:
                close()
            if emb is None:
                toks.append(tok)
                weights.append(run.weight)
                pos += 1
                continue
            if emb.vectors > chunk_len:
                raise InputError(f"embedding `{emb.name}` has {emb.vectors} vectors, more than the {chunk_len} of a chunk")
            if len(toks) + emb.vectors > chunk_len:
                close()
            fixes.append((len(toks), emb.name))
            toks += [0] * emb.vectors
            weights += [run.weight] * emb.vectors
            pos += len(emb.name_ids)
    if toks or not chunks:
        close()
    return chunks


# --- the CLIP tokenizer, torch-free -------------------------------------------------------------

TOKENIZER_DIR = Path(__file__).parent / "data" / "clip-tokenizer"
BOS_ID, EOS_ID = 49406, 49407


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    """The shipped CLIP BPE tokenizer as a `tokenizers.Tokenizer` (what transformers' CLIP
    tokenizer runs underneath: NFC, whitespace folding, lower case, CLIP's split, byte-level BPE)."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<|endoftext|>", continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    split = Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


@functools.lru_cache(maxsize=65536)
def _tokens(text: str) -> tuple[int, ...]:
    return tuple(_clip_tokenizer().encode(text, add_special_tokens=False).ids)


def clip_tokenize(text: str) -> list[int]:
    """CLIP token ids of `text`, without BOS/EOS (torch-free; cached, as prompt variants repeat)."""
    return list(_tokens(text))


COMMA_ID = 267  # "," in the CLIP vocabulary


def token_count(text: str, syntax: str = DEFAULT_SYNTAX, emphasis: str = DEFAULT_EMPHASIS) -> int:
    """How many CLIP tokens the encoder gets from `text` (weights and BREAKs removed)."""
    return sum(len(clip_tokenize(r.text)) for r in prompt_runs(text, syntax, emphasis) if r.text)


def count_chunks(text: str, syntax: str = DEFAULT_SYNTAX, emphasis: str = DEFAULT_EMPHASIS,
                 embeddings: Sequence[Embedding] = ()) -> int:
    """The number of 77-token chunks `text` becomes."""
    runs = prompt_runs(text, syntax, emphasis)
    return len(chunk_prompt(runs, clip_tokenize, eos=EOS_ID, comma=COMMA_ID, embeddings=embeddings))


def embedding_stems(names: Mapping[str, int] | Sequence[str]) -> list[Embedding]:
    """`Embedding`s for file stems (with vector counts when `names` is a mapping; else 1)."""
    counts = names if isinstance(names, Mapping) else {n: 1 for n in names}
    return [Embedding(n, tuple(clip_tokenize(n)), int(v)) for n, v in counts.items()]
