"""Options every command shares, resolved once by the CLI and passed down frozen."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

CACHE_ENV = "SDXL_SPLIT_CACHE"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("sdxl-split"))


@dataclass(frozen=True)
class GlobalOptions:
    model: str
    revision: str | None
    cache_dir: Path
    verbosity: int = 0

    @property
    def embeddings_dir(self) -> Path:
        return self.cache_dir / "embeddings"


def cache_dir_from(value: str | None) -> Path:
    return Path(os.path.expanduser(value)) if value else default_cache_dir()
