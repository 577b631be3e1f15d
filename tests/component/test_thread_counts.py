"""torch's thread count holds on every thread that runs a model, whatever OMP_NUM_THREADS says."""

from __future__ import annotations

import os
import subprocess
import sys

# OpenMP's count is per thread: a thread that never set it starts from OMP_NUM_THREADS (Ray sets it to 1 in
# its workers). Prints OpenMP's own count on a fresh thread, before and after use_threads there.
PER_THREAD = """
import ctypes, threading
import torch
from sdxl_split.shared.threads import use_threads

gomp = ctypes.CDLL(next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line))
use_threads(2)  # on the main thread only, as a service's setup does
seen = []

def model_thread():
    seen.append(gomp.omp_get_max_threads())
    use_threads(2)
    seen.append(gomp.omp_get_max_threads())

thread = threading.Thread(target=model_thread)
thread.start()
thread.join()
print(gomp.omp_get_max_threads(), *seen)
"""


def test_use_threads_sets_openmp_on_the_thread_that_runs_the_model() -> None:
    done = subprocess.run([sys.executable, "-c", PER_THREAD], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    main, fresh_thread, after_use_threads = map(int, done.stdout.split())
    assert main == 2
    assert fresh_thread == 1, "OMP_NUM_THREADS no longer reaches new threads: this test lost its point"
    assert after_use_threads == 2
