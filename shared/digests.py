"""sha256 of big files (model weights, LoRAs, embeddings), memoised under the cache dir by (path, size, mtime), so
only the first run after a file changes pays for reading it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256_of(file: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_data_sha256(file: Path) -> str:
    """sha256 of a safetensors file's tensor data alone, past its 8-byte length and JSON header: the hash kohya's
    tools and A1111 give a LoRA (its "addnet" hash), which does not change when only the metadata does."""
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def intact(file: Path, sha256: object) -> bool:
    """Whether `file` exists with exactly the bytes whose sha256 was recorded (a record read back from a journal
    or manifest may hold anything)."""
    try:
        return isinstance(sha256, str) and sha256_of(file) == sha256
    except OSError:
        return False


class DigestMemo:
    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / "fingerprints.json"
        try:
            self.memo: dict[str, list] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.memo = {}
        self._changed = False

    def sha256(self, file: Path) -> str:
        return self._memoised(file, "", sha256_of)

    def data_sha256(self, file: Path) -> str:
        """safetensors_data_sha256, memoised like sha256."""
        return self._memoised(file, "data:", safetensors_data_sha256)

    def _memoised(self, file: Path, kind: str, compute) -> str:
        stat = file.stat()
        key = kind + str(file.resolve())
        seen = self.memo.get(key)
        if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
            return seen[2]
        self.memo[key] = [stat.st_size, stat.st_mtime_ns, compute(file)]
        self._changed = True
        return self.memo[key][2]

    def save(self) -> None:
        if not self._changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.memo, sort_keys=True))
        os.replace(tmp, self.path)
        self._changed = False


def file_sha256(file: Path, cache_dir: Path) -> str:
    memo = DigestMemo(cache_dir)
    digest = memo.sha256(file)
    memo.save()
    return digest
