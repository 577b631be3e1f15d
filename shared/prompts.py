"""Prompt files (plain text or JSONL): parsed and validated whole before any work starts."""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from sdxl_split.shared.errors import UserError
from sdxl_split.shared.loras import plain_name_problem
from sdxl_split.shared.text import plural

JSONL_FIELDS = {"prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "seed", "count", "id", "syntax",
                "loras"}
MAX_LORAS = 16
# How a prompt's text is read: as is (diffusers), A1111's or ComfyUI's weights and chunks, or compel's language.
SYNTAXES = ("plain", "a1111", "comfy", "compel")
_TEXT_FIELDS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
MAX_COUNT = 64
MAX_SEED = 2**63 - 1
# Far past CLIP's 77 tokens; the bound keeps one line of a prompt file from becoming megabytes on the wire.
MAX_TEXT_CHARS = 16 * 1024


# A seed of -1 asks for a random one, as in A1111, which draws below this bound.
RANDOM_SEED = -1
_RANDOM_SEEDS_BELOW = 4294967294


def random_seed() -> int:
    """A seed for one that asked for -1, drawn as A1111 draws it."""
    return random.SystemRandom().randrange(_RANDOM_SEEDS_BELOW)


def with_random_seeds(entries: tuple[PromptEntry, ...], default_seed: int = 0) -> tuple[PromptEntry, ...]:
    """Entries whose seed is -1 (or unset, under a default of -1) get a random seed each, drawn once, here: the
    encoder, the denoisers, the PNG and the manifest then all know the same seed."""
    return tuple(replace(e, seed=random_seed())
                 if e.seed == RANDOM_SEED or (e.seed is None and default_seed == RANDOM_SEED) else e for e in entries)


def seed_range_problem(seed: int, count: int) -> str | None:
    """Why a prompt's seeds run out of range, or None: image i of a prompt uses seed+i."""
    if seed + count - 1 > MAX_SEED:
        return f"seed {seed} with {count} images would go past {MAX_SEED} (image i uses seed+i)"
    return None


@dataclass(frozen=True)
class PromptEntry:
    """One prompt as the user wrote it. `seed`/`count` of None mean: use the renderer's defaults."""

    line: int
    prompt: str
    prompt_2: str | None = None
    negative_prompt: str | None = None
    negative_prompt_2: str | None = None
    seed: int | None = None
    count: int | None = None
    id: str | None = None
    # This line's own --prompt-syntax (JSONL `syntax`); None: the run's.
    syntax: str | None = None
    # This line's own LoRAs (JSONL `loras`): (name or path, scale) pairs, on top of the run's --lora.
    loras: tuple[tuple[str, float], ...] | None = None

    def texts(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in _TEXT_FIELDS}


@dataclass(frozen=True)
class PromptFile:
    # What errors and summaries call it: the file, `<stdin>` or `--prompt`.
    path: Path
    entries: tuple[PromptEntry, ...]
    skipped_lines: int
    # Things worth a word that are not errors (a .txt file whose lines look like JSONL, say).
    warnings: tuple[str, ...] = ()
    # What a re-run of the same command recognises it by: the file's absolute path, or a hash of prompts given on
    # stdin or with --prompt.
    identity: str = ""


def _fail(path: Path, line: int, message: str) -> UserError:
    return UserError(f"{path}:{line}: {message}")


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    first = next((s.strip() for s in lines if s.strip() and not s.strip().startswith("#")), "")
    return path.suffix.lower() != ".txt" and first.startswith("{")


def _jsonl_entry(path: Path, number: int, text: str) -> PromptEntry:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(path, number, f"invalid JSON ({err.msg} at column {err.colno}); "
                    "each line must be one JSON object like {\"prompt\": \"...\"}") from None
    if not isinstance(obj, dict):
        raise _fail(path, number, "each JSONL line must be a JSON object like {\"prompt\": \"...\"}")
    unknown = sorted(set(obj) - JSONL_FIELDS)
    if unknown:
        raise _fail(path, number, f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(JSONL_FIELDS))}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _fail(path, number, "'prompt' is required and must be a non-empty string")
    for name in _TEXT_FIELDS[1:] + ("id", "syntax"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise _fail(path, number, f"{name!r} must be a string")
    if obj.get("syntax") is not None and obj["syntax"] not in SYNTAXES:
        raise _fail(path, number, f"'syntax' {obj['syntax']!r} is not one of {', '.join(SYNTAXES)}")
    for name, low, high in (("seed", RANDOM_SEED, MAX_SEED), ("count", 1, MAX_COUNT)):
        value = obj.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise _fail(path, number, f"{name!r} must be an integer from {low} to {high}")
    loras = _jsonl_loras(path, number, obj.get("loras"))
    if obj.get("seed") is not None and (problem := seed_range_problem(obj["seed"], obj.get("count") or 1)):
        raise _fail(path, number, problem)
    return PromptEntry(line=number, **{k: obj.get(k) for k in JSONL_FIELDS - {"loras"}}, loras=loras)


def _jsonl_loras(path: Path, number: int, value: object) -> tuple[tuple[str, float], ...] | None:
    """`loras`: [{"name": "detail"} or {"path": "/x/style.safetensors", "scale": 0.8}, ...]."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        raise _fail(path, number, f"'loras' must be a list of at most {MAX_LORAS} objects like "
                    '{"name": "detail", "scale": 0.8}')
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"name", "path", "scale"} or ("name" in item) == ("path" in item):
            raise _fail(path, number, "each of 'loras' needs a 'name' or a 'path' (not both) and may have a 'scale'")
        where = item.get("name", item.get("path"))
        scale = item.get("scale", 1.0)
        if not isinstance(where, str) or not where or isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale) or abs(scale) > 100:
            raise _fail(path, number, "a LoRA's name or path must be a string and its scale a number within +-100")
        if "name" in item and (problem := plain_name_problem(where)):
            raise _fail(path, number, f"{problem}; use {{\"path\": ...}} for a file elsewhere")
        # A path is made absolute now, relative to where the command runs, so every process reads the same file.
        out.append((where if "name" in item else str(Path(where).expanduser().absolute()), float(scale)))
    return tuple(out)


def _check_texts(path: Path, entry: PromptEntry) -> None:
    for name, text in entry.texts().items():
        if text is None:
            continue
        if len(text) > MAX_TEXT_CHARS:
            raise _fail(path, entry.line, f"{name} is {len(text)} characters; the limit is {MAX_TEXT_CHARS} "
                        "(CLIP reads only the first 77 tokens anyway)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(path, entry.line, f"{name} holds a lone surrogate escape (like \\ud800); "
                        "write the character itself") from None


STDIN = Path("<stdin>")


def parse_prompt_file(path: Path, default_negative: str | None = None, raw: bytes | None = None) -> PromptFile:
    """Parse and validate the whole file (or `raw`, the bytes read from stdin); raise UserError naming file:line on
    the first problem."""
    if raw is None:
        raw = _read(path)
        identity = str(path.resolve())
    else:
        identity = "sha256:" + hashlib.sha256(raw).hexdigest()
    entries, skipped, warnings = _parse_lines(path, raw)
    return PromptFile(path=path, entries=_with_default_negative(entries, default_negative), skipped_lines=skipped,
                      warnings=warnings, identity=identity)


def prompts_from_texts(texts: tuple[str, ...], default_negative: str | None = None) -> PromptFile:
    """`--prompt TEXT`, repeated: each one a prompt, numbered as lines are."""
    path = Path("--prompt")
    entries = []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise _fail(path, number, "a prompt must not be empty")
        entry = PromptEntry(line=number, prompt=text.strip())
        _check_texts(path, entry)
        entries.append(entry)
    identity = "sha256:" + hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    return PromptFile(path=path, entries=_with_default_negative(entries, default_negative), skipped_lines=0,
                      identity=identity)


def _with_default_negative(entries: list[PromptEntry], negative: str | None) -> tuple[PromptEntry, ...]:
    if negative is None:
        return tuple(entries)
    return tuple(e if e.negative_prompt is not None else replace(e, negative_prompt=negative) for e in entries)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such prompt file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass a prompt file (one prompt per line, or JSONL)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


def _parse_lines(path: Path, raw: bytes) -> tuple[list[PromptEntry], int, tuple[str, ...]]:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise _fail(path, line, "not valid UTF-8; re-save the file as UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if text.endswith(("\n", "\r")):
        lines.pop()
    jsonl = _is_jsonl(path, lines)
    entries: list[PromptEntry] = []
    skipped = 0
    looks_jsonl: list[int] = []
    for number, line in enumerate(lines, start=1):
        if "\x00" in line:
            raise _fail(path, number, "contains a NUL byte; is this a binary file?")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            skipped += 1
            continue
        entry = _jsonl_entry(path, number, stripped) if jsonl else PromptEntry(line=number, prompt=stripped)
        if not jsonl and _looks_like_record(stripped):
            looks_jsonl.append(number)
        _check_texts(path, entry)
        entries.append(entry)
    if not entries:
        raise UserError(f"{path}: no prompts found; write one prompt per line (lines starting with # are comments)")
    first_use: dict[str, int] = {}
    for entry in entries:
        if entry.id is not None and first_use.setdefault(entry.id, entry.line) != entry.line:
            raise _fail(path, entry.line, f"id {entry.id!r} is already used on line {first_use[entry.id]}; "
                        "ids must be unique")
    warnings = ()
    if looks_jsonl:
        warnings = (f"{path}:{looks_jsonl[0]}: {plural(len(looks_jsonl), 'line')} look like JSONL records, but a "
                    f"{path.suffix or 'suffix-less'} file is read as plain text (the suffix decides: .jsonl for "
                    "JSONL); each line is encoded as literal prompt text",)
    return entries, skipped, warnings


def _looks_like_record(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "prompt" in obj
