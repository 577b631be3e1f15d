"""Words for the messages users read."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 line', '2 lines', '0 lines'; `many` for nouns that do not take an s."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"
