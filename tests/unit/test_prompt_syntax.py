"""A1111's and ComfyUI's emphasis syntaxes, read as those tools read them (expected values are what their own
parsers return), the places sdxl-split departs on purpose, and properties on arbitrary text."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl_split.encoder_service import comfy_syntax
from sdxl_split.encoder_service.prompt_syntax import BREAK_WEIGHT, MAX_WEIGHT, has_syntax, parse, parse_with_notes

BREAK = ("BREAK", BREAK_WEIGHT)

# A1111's parse_prompt_attention on these texts (its docstring's examples, and the edge cases of Hardening 2).
A1111 = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("((a:200):0.5)", [("a", 100.0)]),  # the limit applies to the final weight, not on the way
    ("((a:1.5))", [("a", 1.6500000000000001)]),
    ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),  # zero and negative weights are weights, and close the bracket
    ("(a:0)", [("a", 0.0)]),
    ("(a: 1.2 )", [("a", 1.2)]),
    ("(a:1e2)", [("a:1e2", 1.1)]),
    ("(a:b:1.2)", [("a:b", 1.2)]),
    ("[[a]]", [("a", 0.8264462809917354)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 0.9090909090909091)]),
    ("a\\b \\\\ c", [("ab \\ c", 1.0)]),
    ("cat, BREAK, dog", [("cat,", 1.0), BREAK, (", dog", 1.0)]),
    ("cat BREAKdog", [("cat BREAKdog", 1.0)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
]


@pytest.mark.parametrize("text, expected", A1111)
def test_a1111_reads_as_a1111_does(text: str, expected: list) -> None:
    pieces, notes = parse_with_notes(text)
    assert pieces == expected and notes == []


def test_a1111_departures_are_on_purpose_and_noted() -> None:
    # A1111 keeps 200: a weight that large only drowns the prompt, so it is limited, and explain says so.
    pieces, notes = parse_with_notes("(a:200)")
    assert pieces == [("a", MAX_WEIGHT)] and "kept at 100" in notes[0]
    # A1111 reads a BREAK in brackets as the word "BREAK" weighted -1.1; here it still breaks.
    pieces, notes = parse_with_notes("(cat BREAK dog)")
    assert pieces == [("cat", 1.1), BREAK, ("dog", 1.1)] and "BREAK inside brackets" in notes[0]
    # A1111 fails on the whole prompt; here the text stays and the bracket counts as a plain one.
    pieces, notes = parse_with_notes("(a:1.2.3) b")
    assert pieces == [("a:1.2.3", 1.1), (" b", 1.0)] and "no weight" in notes[0]
    huge = "9" * 400  # a float of this is infinite
    assert parse(f"(cat:{huge})") == [("cat", MAX_WEIGHT)]


def test_break_and_edge_cases() -> None:
    assert parse("A BREAK B") == [("A", 1.0), BREAK, ("B", 1.0)]
    assert parse("") == [("", 1.0)]
    assert parse("a ) b ] c") == [("a ) b ] c", 1.0)]
    assert not has_syntax("a photo of a cat") and has_syntax("a (photo)")


# ComfyUI's token_weights on these texts.
COMFY = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("((a))", [("a", 1.2100000000000002)]),
    ("((a:1.5))", [("a", 1.5)]),  # an explicit weight is absolute
    ("((a):1.5)", [("a", 1.6500000000000001)]),
    ("(a:-0.5)", [("a", -0.5)]),
    ("(a:1e2)", [("a", 100.0)]),
    ("[[a]]", [("[[a]]", 1.0)]),  # square brackets are text
    ("(unbalanced", [("(unbalanced", 1.0)]),  # an unclosed bracket leaves the rest as text
    ("x) (y", [("x) (y", 1.0)]),
    ("\\(literal\\)", [("(literal)", 1.0)]),
    ("\\[x\\]", [("\\[x\\]", 1.0)]),
    ("cat BREAK dog", [("cat BREAK dog", 1.0)]),  # no BREAK
    ("(a:x)", [("a:x", 1.1)]),
    ("(:1.2)", [(":1.2", 1.1)]),
    ("()", []),
    ("(a:1.2)(b:1.2)", [("a", 1.2), ("b", 1.2)]),  # no merging
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("(((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", 1.0)]),
]


@pytest.mark.parametrize("text, expected", COMFY)
def test_comfy_reads_as_comfyui_does(text: str, expected: list) -> None:
    pieces, notes = comfy_syntax.parse_with_notes(text)
    assert pieces == expected and notes == []


def test_comfy_departures_are_noted() -> None:
    pieces, notes = comfy_syntax.parse_with_notes("(a:inf)")
    assert pieces == [("a", MAX_WEIGHT)] and "kept at 100" in notes[0]
    pieces, notes = comfy_syntax.parse_with_notes("(a:nan)")
    assert pieces == [("a:nan", 1.1)] and "no weight" in notes[0]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab ():[]\\.,-+0123456789BREAKenaif"), max_size=60) | st.text(max_size=40))
def test_the_parsers_never_raise_and_weights_stay_finite_and_limited(text: str) -> None:
    for parsed in (parse(text), comfy_syntax.parse(text)):
        for piece_text, weight in parsed:
            assert isinstance(piece_text, str)
            assert math.isfinite(weight) and abs(weight) <= MAX_WEIGHT
