"""`python -m sdxl_split.cli` as a new process, minus the five CPU seconds its imports cost.

Most of a process test's time went to starting interpreters: torch, diffusers and transformers take about 5 s of
CPU to import, and a link test starts three or four processes. A forkserver imports them once; each CLI process
is then forked from it and runs the CLI's `__main__` with its own arguments, environment, folder and output files.
It is a real process all the same (its own pid, sockets and signal handlers; kill -9 kills it), so what the
process tests check is unchanged. `run` and `bench` still start their own children with a fresh interpreter.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

# Imported once, in the forkserver; nothing of sdxl_split, which reads its settings from the environment.
PRELOAD = ["torch", "diffusers", "transformers", "peft", "zmq", "safetensors.torch", "PIL.Image", "click",
           "psutil", "tqdm"]

_context: multiprocessing.context.ForkServerContext | None = None


def forkserver() -> multiprocessing.context.ForkServerContext:
    """The multiprocessing context whose processes fork from the preloaded server."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _main(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """The child: the environment, folder and output files `python -m sdxl_split.cli ARGV` would have."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["sdxl-split", *argv]
    runpy.run_module("sdxl_split.cli", run_name="__main__", alter_sys=True)


class CliProcess:
    """The parts of subprocess.Popen the tests use, for a CLI process forked from the preloaded server."""

    def __init__(self, argv: list[str], env: dict[str, str], stdout: Path, stderr: Path | None = None,
                 cwd: Path | None = None) -> None:
        self.args = ["sdxl-split", *argv]
        self.stdout_path, self.stderr_path = stdout, stderr or stdout
        for path in {self.stdout_path, self.stderr_path}:
            path.touch()
        self._process = forkserver().Process(
            target=_main, args=(argv, env, str(cwd or os.getcwd()), str(self.stdout_path), str(self.stderr_path)),
            daemon=False)
        self._process.start()
        self.pid: int = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        return self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace")


def run_cli_process(argv: list[str], env: dict[str, str], workdir: Path, cwd: Path | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) for a CLI process; its output goes through files in
    WORKDIR, which must be unique to the call."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = CliProcess(argv, env, workdir / "stdout", workdir / "stderr", cwd=cwd)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
        raise
    out, err = proc.output()
    return subprocess.CompletedProcess(proc.args, code, out, err)
