import pytest

from imagegen.prompts import PromptSyntaxError, count_variants, expand, folder_wildcards, sample_variants


def test_alternatives_nest_in_written_order():
    assert expand("a {red|{dark|light} blue} chair") == ["a red chair", "a dark blue chair", "a light blue chair"]


def test_product_of_groups_last_group_fastest():
    assert expand("{a|b}{1|2}") == ["a1", "a2", "b1", "b2"]


def test_choose_k_is_combinations_with_default_and_custom_joiner():
    assert expand("{2$$a|b|c}") == ["a, b", "a, c", "b, c"]
    assert expand("{2$$ and $$a|b|c}") == ["a and b", "a and c", "b and c"]
    assert expand("{1-2$$x|y}") == ["x", "y", "x, y"]


def test_choose_k_with_nested_options_counts_all():
    assert count_variants("{2$$a|{b|c}|d}") == len(expand("{2$$a|{b|c}|d}")) == 5


def test_escapes_are_literal():
    assert expand(r"\{not a group\} \| \$\$ \_\_x\_\_ \\") == ["{not a group} | $$ __x__ \\"]


def test_empty_option_inside_alternatives_is_allowed():
    assert expand("a{| big} cat") == ["a cat", "a big cat"]


@pytest.mark.parametrize(
    "template, column, words",
    [
        ("a {red|blue", 3, "unbalanced `{`"),
        ("a red}", 6, "unbalanced `}`"),
        ("a|b", 2, "outside braces"),
        ("x {}", 3, "empty option list"),
        ("{3$$a|b}", 1, "cannot choose 3 of 2"),
        ("{2$$a||b}", 1, "empty option"),
        ("bad \\q", 5, "escapes only"),
        ("__ not closed", 1, "wildcard"),
    ],
)
def test_syntax_errors_name_the_column(template, column, words):
    with pytest.raises(PromptSyntaxError) as exc:
        expand(template)
    assert exc.value.column == column
    assert words in exc.value.message
    assert f"column {column}" in exc.value.message


def test_wildcards_read_files_skip_comments_and_nest(tmp_path):
    (tmp_path / "colour.txt").write_text("# colours\nred\n\n{dark|light} blue\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "thing.txt").write_text("vase\n__colour__ cup\n")
    load = folder_wildcards(tmp_path)
    assert expand("__colour__ hat", load) == ["red hat", "dark blue hat", "light blue hat"]
    assert expand("__sub/thing__", load) == ["vase", "red cup", "dark blue cup", "light blue cup"]


def test_missing_and_empty_and_recursive_wildcards_are_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "loop.txt").write_text("__loop__ again\n")
    load = folder_wildcards(tmp_path)
    with pytest.raises(PromptSyntaxError, match="does not exist"):
        expand("__nope__", load)
    with pytest.raises(PromptSyntaxError, match="no options"):
        expand("__empty__", load)
    with pytest.raises(PromptSyntaxError, match="includes itself"):
        expand("__loop__", load)
    with pytest.raises(PromptSyntaxError, match="no `wildcards` folder"):
        expand("__colour__")


def test_sampling_is_reproducible_distinct_and_in_expansion_order():
    template = "{a|b|c|d|e}{1|2|3|4}{x|y}"
    full = expand(template)
    s1 = sample_variants(template, 7, seed=42)
    assert s1 == sample_variants(template, 7, seed=42)
    assert s1 != sample_variants(template, 7, seed=43)
    assert len(set(s1)) == 7 and set(s1) <= set(full)
    assert s1 == sorted(s1, key=full.index)


def test_sampling_huge_template_does_not_enumerate():
    template = "{a|b|c|d|e|f|g|h|i|j}" * 8  # 10^8 variants
    assert count_variants(template) == 10**8
    assert len(sample_variants(template, 5, seed=1)) == 5
    with pytest.raises(PromptSyntaxError, match="use `sample`"):
        expand(template)


def test_sampling_more_than_available_is_an_error():
    with pytest.raises(PromptSyntaxError, match="more variants than the template has"):
        sample_variants("{a|b}", 3, seed=0)


# --- hostile and huge templates: counted, never walked --------------------------------------

import itertools  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from imagegen.prompts import MAX_DEPTH, parse_template  # noqa: E402


def _reference_choose(options: list[list[str]], sizes: range, joiner: str = ", ") -> list[str]:
    """The documented order, by brute force: sizes, then combinations, then mixed radix."""
    out = []
    for k in sizes:
        for combo in itertools.combinations(range(len(options)), k):
            out += [joiner.join(p) for p in itertools.product(*(options[j] for j in combo))]
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=6), st.data())
def test_choose_k_order_and_count_match_brute_force(option_sizes, data):
    options = [[f"o{j}v{v}" for v in range(m)] for j, m in enumerate(option_sizes)]
    lo = data.draw(st.integers(0, len(options)))
    hi = data.draw(st.integers(lo, len(options)))
    body = "|".join("{" + "|".join(o) + "}" if len(o) > 1 else o[0] for o in options)
    assert expand(f"{{{lo}-{hi}$${body}}}") == _reference_choose(options, range(lo, hi + 1))


def test_huge_choose_k_is_counted_and_indexed_without_walking_it():
    node = parse_template("{8$$" + "|".join(f"w{i}" for i in range(60)) + "}")
    assert node.count() == 2_558_620_845  # C(60, 8)
    assert node.nth(0) == "w0, w1, w2, w3, w4, w5, w6, w7"
    assert node.nth(node.count() - 1) == "w52, w53, w54, w55, w56, w57, w58, w59"
    with pytest.raises(PromptSyntaxError, match="2558620845 variants"):
        expand("{8$$" + "|".join(f"w{i}" for i in range(60)) + "}")
    assert len(set(sample_variants("{8$$" + "|".join(f"w{i}" for i in range(60)) + "}", 5, seed=1))) == 5


def test_deep_nesting_is_one_error_not_a_crash():
    with pytest.raises(PromptSyntaxError, match=f"nest more than {MAX_DEPTH} deep"):
        parse_template("{a|" * 3000 + "}" * 3000)
    assert count_variants("{a|" * 10 + "b" + "}" * 10) == 11


def test_wildcards_stay_inside_their_folder(tmp_path):
    words = tmp_path / "wild"
    words.mkdir()
    (words / "colour.txt").write_text("red\nblue\n")
    (tmp_path / "secret.txt").write_text("client secret\n")
    (words / "link.txt").symlink_to(tmp_path / "secret.txt")
    load = folder_wildcards(words)
    assert expand("__colour__", load) == ["red", "blue"]
    for name in ("sub/../../secret", "a/../../secret", "link"):
        with pytest.raises(PromptSyntaxError, match="outside the wildcards folder"):
            expand(f"a __{name}__", load)
    with pytest.raises(PromptSyntaxError):  # not even a wildcard name
        expand("a __../secret__", load)


def test_special_files_as_wildcards_are_refused_at_once(tmp_path):
    words = tmp_path / "wild"
    words.mkdir()
    os.mkfifo(words / "fifo.txt")  # reading it would block forever
    (words / "zero.txt").symlink_to("/dev/zero")  # reading it never ends
    load = folder_wildcards(words)
    started = time.monotonic()
    with pytest.raises(PromptSyntaxError, match="is not a regular file"):
        expand("__fifo__", load)
    with pytest.raises(PromptSyntaxError, match="outside the wildcards folder|is not a regular file"):
        expand("__zero__", load)
    assert time.monotonic() - started < 60  # a hang guard, not a speed test
