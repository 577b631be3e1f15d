"""A1111's prompt-emphasis syntax, parsed into (text, weight) pieces with BREAK markers. Pure Python, no model.

Rules (those of AUTOMATIC1111's `parse_prompt_attention`, which ComfyUI users write too):
- `(text)` multiplies the weight of text by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3;
  nested brackets multiply;
- `\\(` `\\)` `\\[` `\\]` and `\\\\` are the literal characters; a lone backslash is dropped;
- an opening bracket never closed applies to the end of the prompt; a stray `)` or `]` is literal text;
- `BREAK` (a whole word, upper case) starts a new 75-token chunk;
- neighbouring pieces of exactly the same weight are merged; an empty prompt is one empty piece.

Where A1111 would make a weight negative, zero or infinite (`(x:-1)`, `(x:1e999)`, a BREAK inside brackets), this
parser does not: an explicit weight must be a finite number above 0 or it is literal text, a BREAK always breaks,
and every weight is kept within [MIN_WEIGHT, MAX_WEIGHT]. So a weight is always positive and finite.
"""

from __future__ import annotations

import math
import re

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = "BREAK"
# A piece with this weight is a chunk break, not text.
BREAK_WEIGHT = -1.0
MIN_WEIGHT = 1e-4
MAX_WEIGHT = 100.0

_TOKEN = re.compile(r"""
      \\[()\[\]\\]          # an escaped bracket or backslash
    | \\                    # a lone backslash
    | [(\[]                 # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)  # an explicit weight closing a round bracket
    | [)\]]                 # a closing bracket
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that closes nothing
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Piece = tuple[str, float]


def parse(text: str) -> list[Piece]:
    """(text, weight) pieces in order; a (BREAK, -1.0) piece marks a chunk break."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] != BREAK_WEIGHT:
                piece[1] = min(MAX_WEIGHT, max(MIN_WEIGHT, piece[1] * factor))

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "1.2.3" matches the pattern but is no number
                factor = float("nan")
            if not (math.isfinite(factor) and factor > 0):
                pieces.append([token, 1.0])
                continue
            scale(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            parts = _BREAK.split(token)
            for n, part in enumerate(parts):
                if n:
                    pieces.append([BREAK, BREAK_WEIGHT])
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    return _merged(pieces)


def _merged(pieces: list[list]) -> list[Piece]:
    out: list[list] = []
    for text, weight in pieces:
        if out and out[-1][1] == weight and weight != BREAK_WEIGHT:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(text, weight) for text, weight in out] or [("", 1.0)]


def is_break(piece: Piece) -> bool:
    return piece == (BREAK, BREAK_WEIGHT)


def has_syntax(text: str) -> bool:
    """Whether parsing changes anything: a prompt without brackets, escapes or BREAK compiles like plain text."""
    return parse(text) != [(text, 1.0)]
