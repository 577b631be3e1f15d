"""One benchmark row in its own fresh process: `python -m sdxl_split.bench.row JOB.json RESULT.json`."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

from sdxl_split.bench.job import RowTask


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def run(job: RowTask) -> dict:
    """Load, warm up and time the row; return its result record (memory from this process alone)."""
    from sdxl_split.bench.sides import RUNNERS
    from sdxl_split.bench.timing import latency_stats, phase_figures
    from sdxl_split.shared.devices import cuda_index
    from sdxl_split.shared.memory import MemoryMeter
    from sdxl_split.shared.quiet import quiet_libraries

    quiet_libraries(job.verbosity)
    device = job.encoder_device if job.side == "encoder" else job.render_config().device
    meter = MemoryMeter(cuda_device=cuda_index(device))
    settings = {"device": device, "dtype": job.encoding["dtype"]} if job.side == "encoder" else job.render
    record: dict = {"row": job.row_id, "side": job.side, "pid": os.getpid(), "parent_pid": os.getppid(),
                    "settings": settings}
    try:
        source = job.model_source()

        def loaded() -> None:
            if job.crash:
                os.kill(os.getpid(), signal.SIGKILL)

        measured = RUNNERS[job.side](job, source, meter, loaded)
    except Exception as err:  # the row failed; the bench reports it and goes on with the others
        traceback.print_exc()  # into the row's log, whose tail the parent keeps in the JSON
        record.update(status="failed", error=_one_line(err), memory=meter.summary())
        return record
    finally:
        meter.close()
    record.update(
        # Other work on the machine skews CPU timings; keep what the kernel saw, to judge them by.
        load_avg_1m=os.getloadavg()[0],
        status="ok",
        error=None,
        warmup_ms=measured.warmup_ms,
        latencies_ms=measured.latencies_ms,
        cpu_ms=measured.cpu_ms,
        images_per_repeat=measured.images_per_repeat,
        phase_ms=measured.phase_ms,
        **phase_figures(measured.phase_ms, (job.render or {}).get("steps")),
        components=measured.components,
        memory=meter.summary(),
        **latency_stats(measured.latencies_ms, measured.images_per_repeat),
    )
    return record


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m sdxl_split.bench.row JOB.json RESULT.json", file=sys.stderr)
        return 2
    from sdxl_split.shared.processes import die_with_parent

    die_with_parent()
    job = RowTask.from_json(Path(argv[0]).read_text())
    record = run(job)
    from sdxl_split.shared.atomic import atomic_write_bytes

    atomic_write_bytes(Path(argv[1]), json.dumps(record, sort_keys=True).encode())
    if record["status"] != "ok":
        print(f"row {job.row_id} failed: {record['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
