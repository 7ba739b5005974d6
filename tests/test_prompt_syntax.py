"""A1111 prompt syntax: weights (A1111's documented examples as a table), BREAK, LoRA tags,
75-token chunks with comma backtrack, embeddings kept whole, and the torch-free tokenizer."""

from __future__ import annotations

import pytest

from imagegen.errors import InputError
from imagegen.prompt_syntax import (
    BREAK,
    COMMA_ID,
    EOS_ID,
    Embedding,
    PromptWeightError,
    Run,
    chunk_prompt,
    clip_tokenize,
    count_chunks,
    extract_lora_tags,
    has_weight_syntax,
    parse_weights,
    prompt_runs,
    token_count,
)

# A1111's documented parse examples (behaviour), plus BREAK and escapes.
TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("(((house:1.3)))", [("house", 1.573)]),
    ("[blurry]", [("blurry", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(gold foil:1.3), red", [("gold foil", 1.3), (", red", 1.0)]),
    ("a) b]", [("a) b]", 1.0)]),  # closing brackets with nothing open are text
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight with no `(` open is text
    ("(a:b)", [("a:b", 1.1)]),
    ("\\\\ back", [("\\ back", 1.0)]),
    ("(x: 0.5 )", [("x", 0.5)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text, want", TABLE)
def test_weights_match_a1111(text, want):
    got = parse_weights(text)
    assert [r.text for r in got] == [t for t, _ in want]
    assert [r.weight for r in got] == pytest.approx([w for _, w in want], abs=1e-9)


def test_break():
    assert parse_weights("a cat BREAK a dog") == [Run("a cat"), BREAK, Run("a dog")]
    assert parse_weights("BREAKING news, break") == [Run("BREAKING news, break")]
    assert parse_weights("(red BREAK blue)") == [Run("red", 1.1), BREAK, Run("blue", 1.1)]
    assert has_weight_syntax("a BREAK b") and has_weight_syntax("(a)") and not has_weight_syntax("a, b: c")
    assert prompt_runs("(a) BREAK b", emphasis="ignore") == [Run("(a) BREAK b")]
    assert prompt_runs("(a)", syntax="plain") == [Run("(a)")]


def test_bad_weight_is_refused_like_a1111():
    with pytest.raises(PromptWeightError, match="1.2.3"):
        parse_weights("(a:1.2.3)")


def test_lora_tags():
    text, tags = extract_lora_tags("a cat <lora:gold:0.7>, <lora:Silver> shiny")
    assert text == "a cat , shiny"
    assert [(t.name, t.weight) for t in tags] == [("gold", 0.7), ("Silver", 1.0)]
    assert extract_lora_tags("plain") == ("plain", [])
    for bad, msg in [("<hypernet:x:1>", "only `<lora"), ("<lora:x:1:0.5>", "separate"), ("<lora:x:abc>", "not a number")]:
        with pytest.raises(InputError, match=msg):
            extract_lora_tags(bad)


def fake_tokenize(text: str) -> list[int]:
    """One token per word; "," is its own token (id COMMA_ID); words are ids 1000+len."""
    out = []
    for word in text.replace(",", " , ").split():
        out.append(COMMA_ID if word == "," else 1000 + len(word))
    return out


def chunks_of(runs, **kw):
    return chunk_prompt(runs, fake_tokenize, eos=EOS_ID, comma=COMMA_ID, **kw)


def real_len(chunk) -> int:
    return sum(1 for t in chunk.tokens if t != EOS_ID)


def test_chunks_without_commas_cut_at_75():
    chunks = chunks_of([Run(" ".join(["w"] * 150))])
    assert [real_len(c) for c in chunks] == [75, 75]
    assert len(chunks_of([Run(" ".join(["w"] * 151))])) == 3
    one = chunks_of([Run("")])
    assert len(one) == 1 and one[0].tokens == (EOS_ID,) * 75
    ids = one[0].input_ids(1, EOS_ID)
    assert len(ids) == 77 and ids[0] == 1 and set(ids[1:]) == {EOS_ID}
    assert one[0].input_ids(1, EOS_ID, pad_after_eos=0) == [1, EOS_ID] + [0] * 75


def test_comma_backtrack_moves_the_tail_after_the_last_comma():
    # comma at index 60: 14 tokens after it (<= 20) move to the next chunk
    words = ["w"] * 60 + [","] + ["x"] * 30
    chunks = chunks_of([Run(" ".join(words))])
    assert real_len(chunks[0]) == 61 and chunks[0].tokens[60] == COMMA_ID
    assert real_len(chunks[1]) == 30
    # comma at index 40: 34 tokens after it (> 20): cut at 75 as usual
    words = ["w"] * 40 + [","] + ["x"] * 50
    chunks = chunks_of([Run(" ".join(words))])
    assert [real_len(c) for c in chunks] == [75, 16]
    # weights travel with the moved tokens
    chunks = chunks_of([Run(" ".join(["w"] * 70) + ","), Run("a b c d e f", 1.5)])
    assert real_len(chunks[0]) == 71 and chunks[1].weights[:6] == (1.5,) * 6


def test_break_ends_a_chunk_and_weights_fill_multipliers():
    chunks = chunks_of(parse_weights("(a b:1.5) BREAK c"))
    assert len(chunks) == 2 and chunks[0].weights[:3] == (1.5, 1.5, 1.0)
    assert chunks[0].multipliers()[:3] == [1.0, 1.5, 1.5] and len(chunks[0].multipliers()) == 77
    assert len(chunks_of(parse_weights("a BREAK"))) == 1  # a trailing BREAK adds no empty chunk


def test_embeddings_are_never_split():
    emb = Embedding("myemb", tuple(fake_tokenize("myemb")), 8)
    chunks = chunks_of([Run(" ".join(["w"] * 70) + " myemb tail")], embeddings=[emb])
    assert real_len(chunks[0]) == 70  # 70 + 8 > 75: the embedding starts the next chunk
    assert chunks[1].embeddings == ((0, "myemb"),) and chunks[1].tokens[:8] == (0,) * 8
    with pytest.raises(InputError, match="vectors"):
        chunks_of([Run("myemb")], embeddings=[Embedding("myemb", emb.name_ids, 80)])


def test_clip_tokenizer_is_torch_free_and_matches_transformers():
    import subprocess
    import sys

    code = "import sys, imagegen.prompt_syntax as p; p.clip_tokenize('a cat'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    transformers = pytest.importorskip("transformers")
    from imagegen.engine.builtin import _tokenizer

    tok = _tokenizer()
    for text in ["a photo of a cat, 4k", "Gold   foil\nCafé déjà-vu!!", "(masterpiece:1.2), 8k uhd, f/1.8 — 日本", "it's 3.5mm"]:
        assert clip_tokenize(text) == tok(text, add_special_tokens=False).input_ids, text
    assert clip_tokenize(",") == [COMMA_ID]
    long = ", ".join(["a red vase on a table"] * 30)
    assert token_count(long) == len(tok(long, add_special_tokens=False).input_ids) > 150
    assert count_chunks(long) >= 3 and count_chunks("a cat") == 1
