"""Runs one row's job in a fresh Python process and turns any way it can end into a result record."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from sdxl_split.bench.job import RowTask

LOG_TAIL_LINES = 20


def _tail(path: Path) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if line.strip()][-LOG_TAIL_LINES:]


def _death_reason(returncode: int, tail: list[str]) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"row process killed by {name}{hint}"
    last = tail[-1] if tail else "no output"
    return f"row process exited with code {returncode}: {last[:300]}"


def run_in_fresh_process(job: RowTask, workdir: Path, timeout_s: float) -> dict:
    """Spawn `python -m sdxl_split.bench.row`, wait, and read its result; a child that dies or hangs becomes
    a failed record carrying its pid, exit status and the tail of its output."""
    job_path = workdir / f"{job.row_id}.job.json"
    result_path = workdir / f"{job.row_id}.result.json"
    log_path = workdir / f"{job.row_id}.log"
    job_path.write_text(job.to_json())
    result_path.unlink(missing_ok=True)
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sdxl_split.bench.row", str(job_path), str(result_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        timed_out = False
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            returncode = proc.wait()
        except BaseException:  # Ctrl-C in the parent: never leave a child holding the GPU
            proc.kill()
            proc.wait()
            raise
    tail = _tail(log_path)
    # The whole process, imports and loading included: what a user waits for, beyond the timed repeats.
    record: dict = {"exit_code": returncode, "log_tail": tail, "process_s": time.perf_counter() - started}
    if result_path.is_file():
        record.update(json.loads(result_path.read_text()))
        return record
    error = f"row timed out after {timeout_s:.0f} s" if timed_out else _death_reason(returncode, tail)
    record.update(row=job.row_id, side=job.side, pid=proc.pid, status="failed", error=error)
    return record
