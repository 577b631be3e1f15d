"""The content-addressed embedding cache: one validated safetensors file per key, written atomically."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sdxl_split.shared.atomic import atomic_write_bytes
from sdxl_split.shared.embeddings import EmbeddingFormatError, Embeddings, decode_embeddings

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class CacheLookup:
    """A hit carries the record and its bytes (sent as-is on the wire); a bad file carries why."""

    key: str
    record: Embeddings | None = None
    data: bytes | None = None
    problem: str | None = None

    @property
    def hit(self) -> bool:
        return self.record is not None


class EmbeddingCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        # Two-level fan-out keeps folders small at millions of prompts.
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def lookup(self, key: str) -> CacheLookup:
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return CacheLookup(key)
        except OSError as err:
            return CacheLookup(key, problem=f"{path}: unreadable ({err.strerror})")
        try:
            record = decode_embeddings(data, expected_key=key)
        except EmbeddingFormatError as err:
            return CacheLookup(key, problem=f"{path}: {err}")
        return CacheLookup(key, record=record, data=data)

    def store(self, record: Embeddings) -> bytes:
        data = record.to_bytes()
        atomic_write_bytes(self.path_for(record.key), data)
        return data

    def files(self) -> Iterator[Path]:
        if self.root.is_dir():
            yield from sorted(self.root.glob(f"??/*{SUFFIX}"))
