"""Field checks for the wire protocol: every value a peer sends is typed and ranged here before use."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from sdxl_split.shared.prompts import MAX_COUNT, MAX_LORAS, MAX_TEXT_CHARS, SYNTAXES, PromptEntry

MAX_INT = 2**63 - 1
MAX_FILENAME_CHARS = 255
MAX_PATH_CHARS = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ProtocolError(ValueError):
    """Frames that are not a valid message of this protocol; the only error `decode` raises."""


# Shared by construction (sender bugs) and decode (hostile or broken peers).


def int_field(value: Any, name: str, low: int, high: int = MAX_INT) -> int:
    # bool is an int subclass; True must never pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError(f"{name} must be from {low} to {high}, got {value}")
    return value


def str_field(value: Any, name: str, low: int, high: int) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string, got {type(value).__name__}")
    if not low <= len(value) <= high:
        raise ProtocolError(f"{name} must be {low} to {high} characters, got {len(value)}")
    try:
        # JSON can carry lone surrogates; they would make re-encoding (or a file name) fail later.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{name} is not valid Unicode text") from None
    return value


def optional_str(value: Any, name: str, high: int = MAX_TEXT_CHARS) -> str | None:
    return None if value is None else str_field(value, name, 0, high)


def optional_int(value: Any, name: str, low: int, high: int) -> int | None:
    return None if value is None else int_field(value, name, low, high)


def hex64_field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ProtocolError(f"{name} must be 64 lowercase hex digits")
    return value


def short_hex_field(value: Any, name: str, high: int = 64) -> str:
    """A hash shown to people (A1111's short LoRA hash): up to `high` hex digits, or empty when unknown."""
    if not isinstance(value, str) or len(value) > high or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise ProtocolError(f"{name} must be at most {high} hex digits")
    return value


def seconds_field(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ProtocolError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def filename_field(value: Any, name: str) -> str:
    value = str_field(value, name, 1, MAX_FILENAME_CHARS)
    # Receivers join this onto their output folder; anything but a plain basename could escape it.
    if "/" in value or "\\" in value or "\x00" in value or value in (".", ".."):
        raise ProtocolError(f"{name} must be a plain file name, got {value!r}")
    if len(value.encode("utf-8")) > MAX_FILENAME_CHARS:
        raise ProtocolError(f"{name} is longer than {MAX_FILENAME_CHARS} bytes")
    return value


def exact_keys(obj: dict[str, Any], expected: Sequence[str], what: str) -> None:
    missing = sorted(set(expected) - set(obj))
    unknown = sorted(set(obj) - set(expected))
    if missing:
        raise ProtocolError(f"{what} is missing field {missing[0]!r}")
    if unknown:
        raise ProtocolError(f"{what} has unknown field {unknown[0]!r}")


_ENTRY_FIELDS = tuple(f.name for f in fields(PromptEntry))


def entry_field(value: Any, name: str) -> PromptEntry:
    if isinstance(value, PromptEntry):
        value = {f: getattr(value, f) for f in _ENTRY_FIELDS}
    if not isinstance(value, dict):
        raise ProtocolError(f"{name} must be an object")
    exact_keys(value, _ENTRY_FIELDS, name)
    prompt = str_field(value["prompt"], f"{name}.prompt", 1, MAX_TEXT_CHARS)
    if not prompt.strip():
        raise ProtocolError(f"{name}.prompt must not be blank")
    return PromptEntry(
        line=int_field(value["line"], f"{name}.line", 0),
        prompt=prompt,
        prompt_2=optional_str(value["prompt_2"], f"{name}.prompt_2"),
        negative_prompt=optional_str(value["negative_prompt"], f"{name}.negative_prompt"),
        negative_prompt_2=optional_str(value["negative_prompt_2"], f"{name}.negative_prompt_2"),
        seed=optional_int(value["seed"], f"{name}.seed", 0, MAX_INT),
        count=optional_int(value["count"], f"{name}.count", 1, MAX_COUNT),
        id=optional_str(value["id"], f"{name}.id"),
        syntax=_syntax(value["syntax"], f"{name}.syntax"),
        loras=_loras(value["loras"], f"{name}.loras"),
    )


def _loras(value: Any, name: str) -> tuple[tuple[str, float], ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) > MAX_LORAS:
        raise ProtocolError(f"{name} must be a list of at most {MAX_LORAS} [name, scale] pairs")
    out = []
    for n, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ProtocolError(f"{name}[{n}] must be a [name, scale] pair")
        out.append((str_field(pair[0], f"{name}[{n}].name", 1, MAX_PATH_CHARS), scale_field(pair[1], f"{name}[{n}]")))
    return tuple(out)


def scale_field(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or abs(value) > 100:
        raise ProtocolError(f"{name} scale must be a finite number within +-100")
    return float(value)


def _syntax(value: Any, name: str) -> str | None:
    if value is not None and value not in SYNTAXES:
        raise ProtocolError(f"{name} must be one of {SYNTAXES}")
    return value


def entry_json(entry: PromptEntry) -> dict[str, Any]:
    out = {f: getattr(entry, f) for f in _ENTRY_FIELDS}
    if entry.loras is not None:
        out["loras"] = [list(pair) for pair in entry.loras]
    return out
