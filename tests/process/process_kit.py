"""What the process tests share: a Link that starts real encoder/denoiser processes on a private endpoint, and
checks on what they leave behind (journal, manifest, PNGs)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from cli_process import CliProcess
from conftest import cli_env, hang_bound, short_ipc_endpoint

RENDER = ["--size", "64x64", "--steps", "4"]


def prompts_file(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt number {i}, a small watercolor\n" for i in range(n)))
    return path


class Link:
    """Starts encoder/denoiser processes on one private endpoint and cleans them up."""

    def __init__(self, cache: Path, tmp_path: Path) -> None:
        self.endpoint = short_ipc_endpoint()
        self.env = cli_env(cache, SDXL_SPLIT_BIND=self.endpoint, SDXL_SPLIT_CONNECT=self.endpoint)
        self.tmp = tmp_path
        self.procs: list[CliProcess] = []

    def start(self, *args: str, name: str) -> CliProcess:
        proc = CliProcess(["--model", "tiny", *args], self.env, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def encoder(self, prompts: Path, *extra: str, name: str = "encoder") -> CliProcess:
        return self.start("encode", str(prompts), "--wait", "60", "--json", *extra, name=name)

    def denoiser(self, out: Path, *extra: str, name: str = "denoiser") -> CliProcess:
        # One thread: a two-thread torch process on a loaded 2-core box spins its OpenMP threads waiting for a
        # core, and a 0.1 s job can take minutes.
        return self.start("render", "--out", str(out), *RENDER, "--threads", "1", *extra, name=name)

    def bound(self) -> bool:
        """Whether the encoder has bound its ipc:// endpoint (the socket file exists from then on)."""
        return Path(self.endpoint.removeprefix("ipc://")).exists()

    def wait_ready(self, *names: str) -> None:
        """Until each named denoiser has loaded its model and is taking jobs."""
        for name in names:
            wait_for(lambda name=name: "denoiser ready" in self.log(name))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def journal_records(cache: Path) -> list[dict]:
    return [json.loads(line) for path in (cache / "runs").glob("*.jsonl") for line in path.read_text().splitlines()]


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def encoder_summary(link: Link, proc: CliProcess, name: str = "encoder") -> dict:
    assert proc.wait(timeout=hang_bound(600)) == 0, link.log(name)
    text = link.log(name)
    return json.loads(text[text.index("{\n"):])


def assert_each_image_once(out: Path, expected: int) -> None:
    records = manifest(out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == expected
    assert sorted(r["file"] for r in records) == pngs, "manifest and files disagree"
    for record in records:
        assert hashlib.sha256((out / record["file"]).read_bytes()).hexdigest() == record["sha256"]


def wait_for(predicate, timeout: float = 300.0) -> None:
    """Until `predicate` holds; the timeout only bounds a hang (see conftest.hang_bound)."""
    deadline = time.time() + hang_bound(timeout)
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")
