"""A denoiser killed mid-run: re-running the same command renders only what is missing, and writes nothing twice."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_render_resumes_with_only_the_missing_images(cache_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"prompt number {i}", "seed": i} for i in range(8)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    assert run_cli("--model", "tiny", "encode", str(prompts), cache=cache_dir).returncode == 0
    args = ["--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), "--size", "64x64",
            "--steps", "2"]
    # SIGKILL right after the second new image is on disk: no clean-up runs, as with `kill -9` or a lost node,
    # and no race between a polling test and a fast render.
    killed = run_cli(*args, "--fault", "kill_after_images=2", cache=cache_dir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done_before = {p.name for p in out.glob("*.png")}
    assert len(done_before) == 2
    resumed = run_cli(*args, "--json", cache=cache_dir)
    stats = json.loads(resumed.stdout)["stats"]
    assert stats["images"] == 6 and stats["existing"] == 2
    records = manifest(out)
    assert sorted(r["image_id"] for r in records) == sorted({r["image_id"] for r in records})
    assert {r["file"] for r in records} == {p.name for p in out.glob("*.png")} and len(records) == 8
    for path in out.glob("*.png"):
        Image.open(path).verify()
