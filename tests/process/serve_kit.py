"""What the server's process tests share: a real `sdxl-split serve` process on the tiny model, its port read from
what it prints, and its /health polled until denoisers are attached."""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path

import httpx
import numpy as np
from cli_process import CliProcess
from conftest import cli_env, hang_bound, short_ipc_endpoint
from PIL import Image

# The server's own defaults for requests that do not say: small and quick on the tiny model.
SERVE = ["--size", "64x64", "--steps", "4", "--preview-every", "1"]


class Server:
    def __init__(self, cache: Path, tmp: Path, *args: str, name: str = "server") -> None:
        self.endpoint = short_ipc_endpoint()
        self.env = cli_env(cache, SDXL_SPLIT_BIND=self.endpoint, SDXL_SPLIT_CONNECT=self.endpoint)
        self.tmp = tmp
        self.log_path = tmp / f"{name}.log"
        self.out = tmp / "out"
        self.proc = CliProcess(["--model", "tiny", "serve", "--port", "0", "--out", str(self.out), *SERVE, *args],
                               self.env, self.log_path)
        self.others: list[CliProcess] = []
        found = wait_until(lambda: re.search(r"serving on http://127\.0\.0\.1:(\d+)", self.log()),
                           what=f"the server to listen (log: {self.log_path})", proc=self.proc)
        self.url = f"http://127.0.0.1:{found.group(1)}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, **headers: str) -> dict:
        return httpx.get(f"{self.url}/health", headers=headers, timeout=30).json()

    def wait_for_denoisers(self, count: int = 1) -> None:
        wait_until(lambda: self.health()["denoisers"] >= count, what=f"{count} denoiser(s) to attach",
                   proc=self.proc)

    def remote_denoiser(self, *args: str, name: str) -> CliProcess:
        """A `render --connect ... --serve` denoiser, as on another host."""
        proc = CliProcess(["--model", "tiny", "render", "--connect", self.endpoint, "--serve", "--threads", "1",
                           "--out", str(self.tmp / f"{name}-out"), *args], self.env, self.tmp / f"{name}.log")
        self.others.append(proc)
        return proc

    def close(self) -> None:
        for proc in [*self.others, self.proc]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.others, self.proc]:
            try:
                proc.wait(timeout=hang_bound(60))
            except Exception:  # noqa: BLE001 - a server that will not stop is killed, not waited for
                proc.kill()


def wait_until(predicate, what: str, proc: CliProcess | None = None, timeout: float = 300.0):
    """Until `predicate` is truthy (its value is returned); a bound on a hang, not a speed check."""
    deadline = time.monotonic() + hang_bound(timeout)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.poll()}) while waiting for {what}")
        try:
            if value := predicate():
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pixels(b64_png: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64_png))))
