"""The GPU suite's dry run: the same script a GPU box runs, here on the CPU with the tiny model, so CI keeps it
working between the sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hang_bound

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_writes_the_summary_log_tests_and_bench_files(tmp_path: Path, session_cache: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "cache" / "models").mkdir(parents=True)
    (work / "cache" / "models" / "tiny").symlink_to(session_cache / "models" / "tiny")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "suite.py"), "--dry-run",
                           "--out", str(out), "--work", str(work), "--budget", "240",
                           # One row proves the bench step's plumbing; test_bench_rows runs the rows themselves.
                           "--rows", "encoder"],
                          capture_output=True, text=True, timeout=hang_bound(600))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    names = {path.name for path in out.iterdir()}
    stem = next(name[:-5] for name in names if name.endswith(".json"))
    assert stem.startswith("cpu-")
    assert names == {"suite-dry-run.md", "suite-dry-run.log", "gpu-tests.xml", "gpu-tests.log",
                     f"{stem}.json", f"{stem}.md", f"{stem}.png"}
    summary = (out / "suite-dry-run.md").read_text()
    for step in ("| requirements |", "| pytest -m gpu |", "| bench |"):
        assert step in summary
    # On the CPU every GPU test is collected and skips with its reason, none fails.
    assert "skipped: needs a CUDA GPU" in summary and "failure" not in summary
    payload = json.loads((out / f"{stem}.json").read_text())
    assert {row["row"]: row["status"] for row in payload["rows"]} == {"encoder": "ok"}
