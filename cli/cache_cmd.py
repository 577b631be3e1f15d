"""`sdxl-split cache ...`: list, verify and garbage-collect the embedding cache."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
from safetensors import safe_open

from sdxl_split.cli.common import print_json
from sdxl_split.shared.embedding_cache import SUFFIX, EmbeddingCache
from sdxl_split.shared.embeddings import SCHEMA
from sdxl_split.shared.settings import GlobalOptions

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
# _verify_one's answer for a file removed (by a concurrent gc or encode) after it was listed.
_VANISHED = "vanished"


class DurationError(click.ClickException):
    """A bad --older-than: one `Error:` line and the usage-error exit code, not click's usage block."""

    exit_code = 2


class Duration(click.ParamType):
    """`30d`, `12h`, `45m`, `3600s` (or `2w`) as seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        match = _DURATION.fullmatch(str(value).strip().lower())
        if not match:
            raise DurationError(
                f"--older-than {value!r} is not a duration; use a number and a unit: 30d, 12h, 45m, 3600s or 2w"
            )
        return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class ListedEntry:
    """What `cache ls` shows of one file, read from its header only; `problem` set means BAD."""

    key: str
    path: str
    size: int
    mtime: float
    dtype: str | None = None
    clip_skip: int | None = None
    truncated: bool | None = None
    fingerprint: str | None = None
    texts: dict[str, str | None] | None = None
    problem: str | None = None


def _read_listing(path: Path, size: int, mtime: float) -> ListedEntry:
    base = {"key": path.name.removesuffix(SUFFIX), "path": str(path), "size": size, "mtime": mtime}
    try:
        # safe_open parses and bounds-checks only the header; no tensor is read.
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for malformed files
        return ListedEntry(**base, problem=f"unreadable safetensors header: {err}")
    if meta.get("schema") != SCHEMA:
        return ListedEntry(**base, problem=f"not an {SCHEMA} file")
    try:
        texts = json.loads(meta["texts"])
        settings = json.loads(meta["settings"])
        return ListedEntry(**base, dtype=str(settings["dtype"]), clip_skip=settings["clip_skip"],
                           truncated=meta.get("truncated") == "true", fingerprint=str(settings["fingerprint"]),
                           texts={name: texts.get(name) for name in ("prompt", "prompt_2", "negative_prompt",
                                                                       "negative_prompt_2")})
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return ListedEntry(**base, problem="metadata texts/settings are missing or not JSON")


def _stat_files(cache: EmbeddingCache) -> list[tuple[Path, int, float]]:
    found = []
    for path in cache.files():
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed by a concurrent gc or verify since the listing
            continue
        found.append((path, stat.st_size, stat.st_mtime))
    return found


def format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    seconds = max(seconds, 0)
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit]:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{int(seconds)}s"


def _quoted(text: str, limit: int = 80) -> str:
    # JSON quoting keeps a prompt holding newlines or tabs on its one line.
    return json.dumps(text if len(text) <= limit else text[: limit - 1] + "…", ensure_ascii=False)


def _ls_line(entry: ListedEntry, now: float) -> str:
    head = f"{entry.key[:12]:<12}"
    tail = f"{format_size(entry.size):>10}  {format_age(now - entry.mtime):>4}"
    if entry.problem:
        return f"{head}  BAD  {tail}  {entry.problem}"
    assert entry.texts is not None
    skip = "-" if entry.clip_skip is None else str(entry.clip_skip)
    line = (f"{head}  {entry.dtype:<4}  clip_skip={skip:<2}  {'truncated' if entry.truncated else 'full':<9}  "
            f"{tail}  {_quoted(entry.texts['prompt'] or '')}")
    if entry.texts.get("negative_prompt") is not None:
        line += f"  negative={_quoted(entry.texts['negative_prompt'])}"
    return line


@click.group("cache")
def cache() -> None:
    """List, verify and clean the embedding cache (under --cache-dir, in embeddings/)."""


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead.")
@click.pass_obj
def ls(opts: GlobalOptions, as_json: bool) -> None:
    """List entries: key, dtype, clip_skip, truncation, size, age, prompt.

    One line per file; prompts longer than 80 characters are shortened (--json has them whole).
    Reads only each file's header; files whose header is unreadable are listed as BAD (run
    `cache verify` for a full check of every tensor).
    """
    store = EmbeddingCache(opts.embeddings_dir)
    entries = [_read_listing(path, size, mtime) for path, size, mtime in _stat_files(store)]
    if as_json:
        print_json({"cache_dir": str(store.root), "entries": [asdict(e) for e in entries]})
        return
    now = time.time()
    for entry in entries:
        click.echo(_ls_line(entry, now))
    bad = sum(1 for e in entries if e.problem)
    click.echo(f"{len(entries)} entries ({bad} bad), {format_size(sum(e.size for e in entries))} "
               f"in {store.root}", err=True)


@cache.command("verify")
@click.option("--delete-bad", is_flag=True, help="Remove every file that fails the check.")
@click.pass_obj
def verify(opts: GlobalOptions, delete_bad: bool) -> None:
    """Fully check every file: layout, metadata, key and tensors.

    Exits 1 if any file was bad, also when --delete-bad removed them (the next encode re-creates them).
    """
    store = EmbeddingCache(opts.embeddings_dir)
    checked = 0
    bad: list[Path] = []
    for path in store.files():
        problem = _verify_one(store, path)
        if problem == _VANISHED:
            continue
        checked += 1
        if problem:
            bad.append(path)
            click.echo(f"BAD {problem}")
            if delete_bad:
                path.unlink(missing_ok=True)
    deleted = f", {len(bad)} deleted" if delete_bad and bad else ""
    click.echo(f"{checked} files checked: {checked - len(bad)} ok, {len(bad)} bad{deleted} ({store.root})")
    if bad:
        raise click.exceptions.Exit(1)


def _verify_one(store: EmbeddingCache, path: Path) -> str | None:
    """None when valid, else why (prefixed with the path), or _VANISHED."""
    key = path.name.removesuffix(SUFFIX)
    try:
        expected = store.path_for(key)
    except ValueError:
        return f"{path}: file name is not a cache key"
    if expected != path:
        return f"{path}: belongs in {expected.parent.name}/, not {path.parent.name}/"
    found = store.lookup(key)
    if found.hit:
        return None
    return found.problem or _VANISHED


@cache.command("gc")
@click.option("--older-than", "older_than", type=Duration(), required=True,
              help="Remove entries last written longer ago than this: 30d, 12h, 45m, 3600s.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.pass_obj
def gc(opts: GlobalOptions, older_than: float, dry_run: bool) -> None:
    """Remove entries older than a duration (by modification time)."""
    store = EmbeddingCache(opts.embeddings_dir)
    cutoff = time.time() - older_than
    # `<=` so that `--older-than 0s` means everything, even a file written this very instant.
    doomed = [(path, size) for path, size, mtime in _stat_files(store) if mtime <= cutoff]
    if not dry_run:
        # Fan-out folders stay: removing one could race a concurrent encoder's write into it.
        for path, _ in doomed:
            path.unlink(missing_ok=True)
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {len(doomed)} files, {format_size(sum(size for _, size in doomed))} "
               f"({sum(size for _, size in doomed)} bytes) from {store.root}")
