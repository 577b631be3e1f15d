"""A1111's prompt-emphasis syntax, parsed into (text, weight) pieces with BREAK markers. Pure Python, no model.

The rules of AUTOMATIC1111's `parse_prompt_attention`:
- `(text)` multiplies the weight of text by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3;
  nested brackets multiply; a weight may be zero or negative;
- `\\(` `\\)` `\\[` `\\]` and `\\\\` are the literal characters; a lone backslash is dropped;
- an opening bracket never closed applies to the end of the prompt; a stray `)` or `]` is literal text;
- `BREAK` (a whole word, upper case) starts a new 75-token chunk;
- neighbouring pieces of exactly the same weight are merged; an empty prompt is one empty piece.

Where sdxl-split departs, on purpose (each one reported as a note by `prompt explain`):
- the final weight is kept within +-MAX_WEIGHT (A1111 has no limit; a weight of 1000 only drowns the prompt);
- a BREAK inside brackets still breaks (A1111 turns it into the word "BREAK" with a negative weight);
- a weight that is no number, such as `(a:1.2.3)`, leaves the text literal (A1111 fails on the whole prompt).
"""

from __future__ import annotations

import math
import re

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = "BREAK"
# A piece with this weight is a chunk break, not text.
BREAK_WEIGHT = -1.0
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


class _Parse:
    """One prompt being parsed: pieces as [text, weight, is_break], the open brackets, and notes on departures."""

    def __init__(self) -> None:
        self.pieces: list[list] = []
        self.round_open: list[int] = []
        self.square_open: list[int] = []
        self.notes: list[str] = []

    def scale(self, start: int, factor: float) -> None:
        for piece in self.pieces[start:]:
            if piece[2]:
                self._note("a BREAK inside brackets still starts a new chunk here (A1111 reads it as the word "
                           "'BREAK' with a negative weight)")
            else:
                piece[1] *= factor

    def text(self, token: str) -> None:
        for n, part in enumerate(_BREAK.split(token)):
            if n:
                self.pieces.append([BREAK, BREAK_WEIGHT, True])
            self.pieces.append([part, 1.0, False])

    def weight(self, token: str, weight: str) -> None:
        try:
            factor = float(weight)
        except ValueError:  # "1.2.3" matches the pattern but is no number
            self._note(f"{token.rstrip(')').strip()!r} is no weight, so it stays text and the bracket counts "
                       "1.1 (A1111 fails on this prompt)")
            self.text(token.rstrip(")").rstrip())
            factor = ROUND
        self.scale(self.round_open.pop(), factor)

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def finish(self) -> tuple[list[Piece], list[str]]:
        for start in self.round_open:
            self.scale(start, ROUND)
        for start in self.square_open:
            self.scale(start, SQUARE)
        for piece in self.pieces:
            if not piece[2] and not (math.isfinite(piece[1]) and abs(piece[1]) <= MAX_WEIGHT):
                limited = math.copysign(MAX_WEIGHT, piece[1])
                self._note(f"the weight of {piece[0].strip()!r} is {piece[1]:g}; it is kept at {limited:g} "
                           f"(A1111 has no limit)")
                piece[1] = limited
        return _merged(self.pieces), self.notes


def parse_with_notes(text: str) -> tuple[list[Piece], list[str]]:
    """(text, weight) pieces in order, a (BREAK, -1.0) piece marking each chunk break; and a note for every place
    where sdxl-split departs from A1111 (see the module docstring)."""
    state = _Parse()
    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            state.pieces.append([token[1:], 1.0, False])
        elif token == "(":
            state.round_open.append(len(state.pieces))
        elif token == "[":
            state.square_open.append(len(state.pieces))
        elif weight is not None and state.round_open:
            state.weight(token, weight)
        elif token == ")" and state.round_open:
            state.scale(state.round_open.pop(), ROUND)
        elif token == "]" and state.square_open:
            state.scale(state.square_open.pop(), SQUARE)
        else:
            state.text(token)
    return state.finish()


def parse(text: str) -> list[Piece]:
    return parse_with_notes(text)[0]


def _merged(pieces: list[list]) -> list[Piece]:
    out: list[list] = []
    for text, weight, is_break in pieces:
        if out and not is_break and not out[-1][2] and out[-1][1] == weight:
            out[-1][0] += text
        else:
            out.append([text, BREAK_WEIGHT if is_break else weight, is_break])
    return [(text, weight) for text, weight, _ in out] or [("", 1.0)]


def is_break(piece: Piece) -> bool:
    return piece == (BREAK, BREAK_WEIGHT)


def has_syntax(text: str) -> bool:
    """Whether parsing changes anything: a prompt without brackets, escapes or BREAK compiles like plain text."""
    return parse(text) != [(text, 1.0)]
