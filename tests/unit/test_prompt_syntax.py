"""A1111's emphasis syntax: its documented examples, and properties on arbitrary text."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl_split.encoder_service.prompt_syntax import BREAK_WEIGHT, has_syntax, parse

# parse_prompt_attention's own docstring examples, as A1111 documents them.
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", DOCUMENTED)
def test_a1111_documented_examples(text: str, expected: list) -> None:
    assert parse(text) == expected


def test_break_splits_and_edge_cases_read_as_a1111_does() -> None:
    assert parse("A BREAK B") == [("A", 1.0), ("BREAK", BREAK_WEIGHT), ("B", 1.0)]
    assert parse("") == [("", 1.0)]
    assert parse("(word:1.0)") == [("word", 1.0)]
    assert parse("[a]") == [("a", 1 / 1.1)]
    assert parse("a ) b ] c") == [("a ) b ] c", 1.0)]
    assert parse("\\\\ x \\") == [("\\ x ", 1.0)]
    assert parse("((a:1.3))") == [("a", pytest.approx(1.43))]
    # Where A1111 would go negative, zero or infinite, the text stays literal.
    assert parse("(cat:-1)") == [("cat:-1)", 1.1)]
    huge = "9" * 400  # a float of this is infinite
    assert parse(f"(cat:{huge})") == [(f"cat:{huge})", 1.1)]
    assert not has_syntax("a photo of a cat") and has_syntax("a (photo)")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab ():[]\\.,-+0123456789BREAKe"), max_size=60) | st.text(max_size=40))
def test_the_parser_never_raises_and_weights_stay_positive_and_finite(text: str) -> None:
    for piece_text, weight in parse(text):
        assert isinstance(piece_text, str)
        assert weight == BREAK_WEIGHT or (math.isfinite(weight) and weight > 0)
