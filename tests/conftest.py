"""Shared fixtures: one tiny model per test session, and an isolated cache dir per test."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """A cache dir holding the built-in tiny model, built once for the whole session."""
    from sdxl_split.shared.models.resolve import resolve_model

    root = tmp_path_factory.mktemp("cache")
    resolve_model("tiny", root)
    return root


@pytest.fixture(scope="session")
def tiny_dir(session_cache: Path) -> Path:
    return session_cache / "models" / "tiny"


@pytest.fixture()
def cache_dir(tmp_path: Path, session_cache: Path) -> Path:
    """A fresh cache per test that reuses the session's tiny model (symlinked, not rebuilt)."""
    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    (root / "models" / "tiny").symlink_to(session_cache / "models" / "tiny")
    return root


def short_ipc_endpoint() -> str:
    """A private ipc:// endpoint; unix socket paths must stay under ~100 bytes, so not under tmp_path."""
    return f"ipc://{tempfile.mkdtemp(prefix='sxs-')}/link.ipc"


def cli_env(cache: Path, **extra: str) -> dict[str, str]:
    """Each test's encoder binds its own endpoint, and does not wait for denoisers unless a test says so."""
    return {**os.environ, "SDXL_SPLIT_CACHE": str(cache), "SDXL_SPLIT_BIND": short_ipc_endpoint(),
            "SDXL_SPLIT_WAIT": "0", **extra}


def run_cli(*args: str, cache: Path, cwd: Path | None = None, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `sdxl-split` in a fresh process, as a user would."""
    full_env = {**cli_env(cache), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sdxl_split.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=full_env, cwd=cwd,
    )


@pytest.fixture()
def cli(cache_dir: Path):
    def invoke(*args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli(*args, cache=cache_dir, **kw)

    return invoke
