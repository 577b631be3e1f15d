"""`sdxl-split cache ...`: list, verify and garbage-collect the embedding cache."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from typing import Any

import click

from sdxl_split.cli.common import print_json
from sdxl_split.shared.settings import GlobalOptions
from sdxl_split.shared.text import plural

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class DurationError(click.ClickException):
    """A bad --older-than: one `error:` line and the usage-error exit code, not click's usage block."""

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


_LS_HEADER = f"{'KEY':<12}  {'DTYPE':<5}  {'CLIP SKIP':<9}  {'TEXT':<9}  {'SIZE':>10}  {'AGE':>4}  PROMPT"


def _ls_line(entry, now: float) -> str:
    head = f"{entry.key[:12]:<12}"
    tail = f"{format_size(entry.size):>10}  {format_age(now - entry.mtime):>4}"
    if entry.problem:
        return f"{head}  {'BAD':<5}  {'':<9}  {'':<9}  {tail}  {entry.problem}"
    assert entry.texts is not None
    skip = "-" if entry.clip_skip is None else str(entry.clip_skip)
    line = (f"{head}  {entry.dtype:<5}  {skip:<9}  {'truncated' if entry.truncated else 'full':<9}  "
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
    from sdxl_split.shared.embedding_cache import EmbeddingCache  # imports torch: only when the cache is used

    store = EmbeddingCache(opts.embeddings_dir)
    entries = store.listing()
    if as_json:
        print_json({"cache_dir": str(store.root), "entries": [asdict(e) for e in entries]})
        return
    now = time.time()
    if entries:
        click.echo(_LS_HEADER)
    for entry in entries:
        click.echo(_ls_line(entry, now))
    bad = sum(1 for e in entries if e.problem)
    click.echo(f"{plural(len(entries), 'entry', 'entries')} ({bad} bad), {format_size(sum(e.size for e in entries))} "
               f"in {store.root}", err=True)


@cache.command("verify")
@click.option("--delete-bad", is_flag=True, help="Remove every file that fails the check.")
@click.pass_context
def verify(ctx: click.Context, delete_bad: bool) -> None:
    """Fully check every file: layout, metadata, key and tensors.

    With an explicit --model (`sdxl-split --model M cache verify`), also check that the embeddings are as
    wide as that model's text encoders make them. Exits 1 if any file was bad, also when --delete-bad
    removed them (the next encode re-creates them).
    """
    opts: GlobalOptions = ctx.obj
    widths = None
    if ctx.find_root().get_parameter_source("model") != click.core.ParameterSource.DEFAULT:
        from sdxl_split.cli.common import resolve
        from sdxl_split.shared.models.resolve import text_widths

        widths = text_widths(resolve(opts))
    from sdxl_split.shared.embedding_cache import EmbeddingCache  # imports torch: only when the cache is used

    store = EmbeddingCache(opts.embeddings_dir)
    report = store.verify(delete_bad=delete_bad, widths=widths)
    for _, problem in report.bad:
        click.echo(f"BAD {problem}")
    deleted = f", {report.deleted} deleted" if report.deleted else ""
    click.echo(f"{plural(report.checked, 'file')} checked: {report.checked - len(report.bad)} ok, {len(report.bad)} bad"
               f"{deleted} ({store.root})")
    if report.bad:
        raise click.exceptions.Exit(1)


@cache.command("gc")
@click.option("--older-than", "older_than", type=Duration(), required=True,
              help="Remove entries last written longer ago than this: 30d, 12h, 45m, 3600s.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.pass_obj
def gc(opts: GlobalOptions, older_than: float, dry_run: bool) -> None:
    """Remove entries older than a duration (by modification time)."""
    from sdxl_split.shared.embedding_cache import EmbeddingCache  # imports torch: only when the cache is used

    store = EmbeddingCache(opts.embeddings_dir)
    files, size = store.collect(older_than, dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {plural(files, 'file')}, {format_size(size)} ({size} bytes) from {store.root}")
