"""ComfyUI's prompt-weighting syntax, parsed into (text, weight) pieces. Pure Python, no model.

The rules of ComfyUI's CLIP text encoder (`token_weights` in comfy/sd1_clip.py):
- `(text)` multiplies the weight by 1.1; nested brackets multiply;
- `(text:1.5)` sets the weight to 1.5, whatever brackets it sits in: an explicit weight is absolute, not a factor;
  the weight is what follows the last colon;
- `\\(` and `\\)` are literal brackets; `[ ]` and `\\` are plain text; there is no BREAK;
- a `(` never closed turns the rest of the prompt into plain text, bracket included, at the weight around it; a
  stray `)` turns the rest into plain text too.

Where sdxl-split departs, on purpose (each reported as a note by `prompt explain`): a weight of nan is no weight
(the text stays, at 1.1), and the final weight is kept within +-MAX_WEIGHT (ComfyUI takes inf as it comes).
"""

from __future__ import annotations

import math

from sdxl_split.encoder_service.prompt_syntax import MAX_WEIGHT, ROUND, Piece

# Stand-ins for escaped brackets while groups are found (ComfyUI's own trick: characters no prompt holds).
_OPEN, _CLOSE = "\0\2", "\0\1"


def _groups(text: str) -> list[str]:
    """Top-level `( ... )` groups and the text between them, as ComfyUI splits them (its nesting count may go
    below zero after a stray `)`, which leaves the rest as text)."""
    out: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    out.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                out.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        out.append(current)
    return out


def _weighted(text: str, weight: float, notes: list[str]) -> list[Piece]:
    out: list[Piece] = []
    for group in _groups(text):
        if len(group) < 2 or group[0] != "(" or group[-1] != ")":
            out.append((group, weight))
            continue
        inner, inner_weight = group[1:-1], weight * ROUND
        colon = inner.rfind(":")
        if colon > 0:
            try:
                explicit = float(inner[colon + 1:])
            except ValueError:
                explicit = None
            if explicit is not None and math.isnan(explicit):
                _note(notes, f"{inner[colon + 1:].strip()!r} is no weight, so it stays text")
            elif explicit is not None:
                inner_weight, inner = explicit, inner[:colon]
        out += _weighted(inner, inner_weight, notes)
    return out


def _note(notes: list[str], note: str) -> None:
    if note not in notes:
        notes.append(note)


def parse_with_notes(text: str) -> tuple[list[Piece], list[str]]:
    """(text, weight) pieces in order, empty ones dropped (ComfyUI tokenizes none of them); and a note for every
    place where sdxl-split departs from ComfyUI."""
    notes: list[str] = []
    escaped = text.replace("\\)", _CLOSE).replace("\\(", _OPEN)
    pieces = []
    for piece, weight in _weighted(escaped, 1.0, notes):
        piece = piece.replace(_CLOSE, ")").replace(_OPEN, "(")
        if not piece:
            continue
        if not abs(weight) <= MAX_WEIGHT:
            limited = math.copysign(MAX_WEIGHT, weight)
            _note(notes, f"the weight of {piece.strip()!r} is {weight:g}; it is kept at {limited:g}")
            weight = limited
        pieces.append((piece, weight))
    return pieces, notes


def parse(text: str) -> list[Piece]:
    return parse_with_notes(text)[0]
