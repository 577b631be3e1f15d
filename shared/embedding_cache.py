"""The content-addressed embedding cache: one validated safetensors file per key, written atomically; listing,
verification and garbage collection of its files."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_split.shared.atomic import atomic_write_bytes
from sdxl_split.shared.embeddings import EmbeddingFormatError, Embeddings, decode_embeddings
from sdxl_split.shared.encoding_settings import SCHEMA, TEXT_FIELDS

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Hit:
    """A valid file: the record, and its bytes as they are sent on the wire."""

    key: str
    record: Embeddings
    data: bytes


@dataclass(frozen=True)
class Miss:
    key: str


@dataclass(frozen=True)
class Bad:
    """A file that exists but fails validation; `problem` names the path and why."""

    key: str
    problem: str


Lookup = Hit | Miss | Bad


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


@dataclass
class VerifyReport:
    checked: int = 0
    bad: list[tuple[Path, str]] = field(default_factory=list)
    deleted: int = 0


class EmbeddingCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        # Two-level fan-out keeps folders small at millions of prompts.
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def lookup(self, key: str, widths: tuple[int, int] | None = None) -> Lookup:
        """The record under `key`, validated; with `widths` (a model's text widths), one of another width is
        Bad too, so it is re-encoded instead of failing every render."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Miss(key)
        except OSError as err:
            return Bad(key, f"{path}: unreadable ({err.strerror})")
        try:
            record = decode_embeddings(data, expected_key=key)
        except EmbeddingFormatError as err:
            return Bad(key, f"{path}: {err}")
        if widths is not None and record.widths != widths:
            return Bad(key, f"{path}: holds {record.widths[0]}/{record.widths[1]}-wide embeddings, but this model's "
                            f"text encoders make {widths[0]}/{widths[1]}-wide ones")
        return Hit(key, record, data)

    def store(self, record: Embeddings) -> bytes:
        data = record.to_bytes()
        atomic_write_bytes(self.path_for(record.key), data)
        return data

    def files(self) -> Iterator[Path]:
        if self.root.is_dir():
            yield from sorted(self.root.glob(f"??/*{SUFFIX}"))

    def _stat_files(self) -> list[tuple[Path, int, float]]:
        found = []
        for path in self.files():
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed by a concurrent gc or verify since the listing
                continue
            found.append((path, stat.st_size, stat.st_mtime))
        return found

    def listing(self) -> list[ListedEntry]:
        return [_read_listing(path, size, mtime) for path, size, mtime in self._stat_files()]

    def verify(self, delete_bad: bool = False, widths: tuple[int, int] | None = None) -> VerifyReport:
        """Fully check every file: its place, layout, metadata, key and tensors; with `widths`, that its
        embeddings are as wide as a given model's."""
        report = VerifyReport()
        for path in self.files():
            problem = self._verify_one(path, widths)
            if problem is _VANISHED:
                continue
            report.checked += 1
            if problem:
                report.bad.append((path, problem))
                if delete_bad:
                    path.unlink(missing_ok=True)
                    report.deleted += 1
        return report

    def _verify_one(self, path: Path, widths: tuple[int, int] | None) -> str | object | None:
        """None when valid, else why (naming the path), or _VANISHED for a file removed since it was listed."""
        key = path.name.removesuffix(SUFFIX)
        try:
            expected = self.path_for(key)
        except ValueError:
            return f"{path}: file name is not a cache key"
        if expected != path:
            return f"{path}: belongs in {expected.parent.name}/, not {path.parent.name}/"
        found = self.lookup(key, widths)
        if isinstance(found, Bad):
            return found.problem
        return _VANISHED if isinstance(found, Miss) else None

    def collect(self, older_than_s: float, dry_run: bool = False) -> tuple[int, int]:
        """Remove entries last written longer ago than `older_than_s`: (files, bytes) removed or, with
        dry_run, that would be."""
        # `<=` so that an age of 0 means everything, even a file written this very instant.
        cutoff = time.time() - older_than_s
        doomed = [(path, size) for path, size, mtime in self._stat_files() if mtime <= cutoff]
        if not dry_run:
            # Fan-out folders stay: removing one could race a concurrent encoder's write into it.
            for path, _ in doomed:
                path.unlink(missing_ok=True)
        return len(doomed), sum(size for _, size in doomed)


_VANISHED = object()


def _read_listing(path: Path, size: int, mtime: float) -> ListedEntry:
    from safetensors import safe_open

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
                           texts={name: texts.get(name) for name in TEXT_FIELDS})
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return ListedEntry(**base, problem="metadata texts/settings are missing or not JSON")
