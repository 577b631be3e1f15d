"""How `run` splits the cores between its encoder and its denoisers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from sdxl_split.shared.threads import run_threads


@pytest.mark.parametrize("encoder_on_cpu, denoisers, on_cpu, cores, expected", [
    (True, 1, True, 2, (1, 2)),     # CPU denoiser: every core (the encoder is soon done)
    (True, 2, True, 8, (1, 4)),     # two CPU denoisers split them
    (True, 3, True, 2, (1, 1)),     # never zero threads
    (True, 1, False, 16, (15, 1)),  # GPU denoiser: one thread; the CPU encoder takes the rest
    (True, 4, False, 4, (1, 1)),
    (False, 1, False, 8, (1, 1)),   # encoder on a GPU too
])
def test_run_gives_the_long_running_side_the_cores(encoder_on_cpu, denoisers, on_cpu, cores, expected) -> None:
    assert run_threads(encoder_on_cpu, denoisers, on_cpu, cores) == expected


def test_yield_cores_lowers_every_thread_not_only_the_caller() -> None:
    """Linux keeps a nice value per thread; a finished Ray encoder's teardown runs on threads other than the one
    that asked. Checked in a child process, since a priority once lowered cannot be raised back."""
    script = textwrap.dedent("""
        import os, threading
        from sdxl_split.shared.threads import yield_cores
        started, release = threading.Event(), threading.Event()
        def other():
            started.set()
            release.wait()
        worker = threading.Thread(target=other)
        worker.start()
        started.wait()
        yield_cores()
        nice = [int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])
                for tid in os.listdir("/proc/self/task")]
        release.set()
        worker.join()
        print(nice)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    nice = json.loads(done.stdout)
    assert len(nice) >= 2 and set(nice) == {19}, nice
