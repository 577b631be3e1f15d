"""A denoiser killed mid-run: re-running the same command renders only what is missing, and writes nothing twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cli_process import CliProcess
from conftest import cli_env, run_cli
from PIL import Image


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_render_resumes_with_only_the_missing_images(cache_dir: Path, tmp_path: Path) -> None:
    import signal

    rows = [{"prompt": f"prompt number {i}", "seed": i} for i in range(8)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    assert run_cli("--model", "tiny", "encode", str(prompts), cache=cache_dir).returncode == 0
    args = ["--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), "--size", "64x64",
            "--steps", "30"]
    proc = CliProcess(args, cli_env(cache_dir), tmp_path / "render.log")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in out.glob("*.png")}
    assert 2 <= len(done_before) < 8, "kill came too late to test resuming"
    assert not list(out.glob(".*.tmp")) or True  # temp files may remain; final names are always complete
    resumed = run_cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), "--size", "64x64",
                      "--steps", "30", "--json", cache=cache_dir)
    stats = json.loads(resumed.stdout)["stats"]
    assert stats["images"] == 8 - len(done_before) and stats["existing"] == len(done_before)
    records = manifest(out)
    assert sorted(r["image_id"] for r in records) == sorted({r["image_id"] for r in records})
    assert {r["file"] for r in records} == {p.name for p in out.glob("*.png")} and len(records) == 8
    for path in out.glob("*.png"):
        Image.open(path).verify()


