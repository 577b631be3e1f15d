"""Shared fixtures: one tiny model per test session, and an isolated cache dir per test."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from cli_process import run_cli_process

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every time limit in these tests is a bound on a hang, never a speed check: generous, and scaled up for slow or
# loaded machines with SDXL_SPLIT_TEST_TIME_SCALE (a 2-core box running other work may take several times longer).
TIME_SCALE = float(os.environ.get("SDXL_SPLIT_TEST_TIME_SCALE", "1"))


def hang_bound(seconds: float) -> float:
    return seconds * TIME_SCALE


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


def run_cli(*args: str, cache: Path, cwd: Path | None = None, timeout: float = 900,
            env: dict | None = None, fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """Run `sdxl-split` in a new process, as a user would: forked from a server that has imported torch and
    diffusers already (cli_process), or with FRESH_INTERPRETER exactly as `python -m sdxl_split.cli`."""
    full_env = {**cli_env(cache), **(env or {})}
    timeout = hang_bound(timeout)
    if fresh_interpreter:
        return subprocess.run([sys.executable, "-m", "sdxl_split.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=cwd)
    workdir = Path(tempfile.mkdtemp(prefix="sxs-cli-"))
    try:
        return run_cli_process(list(args), full_env, workdir, cwd=cwd, timeout=timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_IN_PROCESS = threading.Lock()


def invoke_cli(*args: str, cache: Path, cwd: Path | None = None, env: dict | None = None,
               timeout: float | None = None, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Run `sdxl-split` in this process: what run_cli does, without paying for a fresh interpreter. Output,
    environment, working folder, signal handlers and torch's thread counts are put back afterwards; calls
    from several threads take turns."""
    import torch

    from sdxl_split.cli.main import main

    with _IN_PROCESS:
        saved_env, saved_cwd = dict(os.environ), os.getcwd()
        saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        saved_threads = torch.get_num_threads()
        out, err = io.StringIO(), io.StringIO()
        saved_stdin, sys.stdin = sys.stdin, io.TextIOWrapper(io.BytesIO(stdin))
        os.environ.update({**cli_env(cache), **(env or {})})
        if cwd is not None:
            os.chdir(cwd)
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(list(args))
                except SystemExit as done:
                    code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        finally:
            sys.stdin = saved_stdin
            os.environ.clear()
            os.environ.update(saved_env)
            os.chdir(saved_cwd)
            if threading.current_thread() is threading.main_thread():
                for sig, handler in saved_signals.items():
                    signal.signal(sig, handler)
            torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess(["sdxl-split", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture()
def cli(cache_dir: Path):
    """`sdxl-split` in this process (see invoke_cli); tests about processes themselves use run_cli."""

    def invoke(*args: str, **kw) -> subprocess.CompletedProcess:
        return invoke_cli(*args, cache=cache_dir, **kw)

    return invoke


_LAYER_ORDER = {"process": 0, "component": 1, "gpu": 2, "unit": 3}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slowest layer first: the two xdist workers take whole modules in this order (--no-loadscope-reorder), so
    the long process modules start at once instead of being left for the end, when one worker would run alone."""
    items.sort(key=lambda item: _LAYER_ORDER.get(item.path.parent.name, 1))
