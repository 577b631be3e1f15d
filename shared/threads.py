"""CPU threads per process: torch starts one per core in every process, so two processes on one CPU would
fight over the same cores. `run` gives each local process its share; `--threads` sets it by hand."""

from __future__ import annotations

import os
import threading

_this_thread = threading.local()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_threads(count: int | None) -> None:
    """Run torch's intra-op work on `count` threads (None: torch's default, one per core) on the calling thread.

    Call it on every thread that runs a model, not only the main one: OpenMP keeps the count per thread, and a
    thread that never set it starts from OMP_NUM_THREADS. Ray sets that to 1 in its workers and runs map_batches
    calls on a thread of their own, where oneDNN's convolutions then ran on one core while
    torch.get_num_threads() said 2 (measured: 1.68 s against 0.80 s for the same convolutions)."""
    if not count or getattr(_this_thread, "count", None) == count:
        return
    import torch

    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:
        pass  # only settable before the first parallel op; the intra-op count is what matters here
    _this_thread.count = count


def run_threads(encoder_on_cpu: bool, denoisers: int, denoisers_on_cpu: bool,
                cores: int | None = None) -> tuple[int, int]:
    """(encoder threads, threads per denoiser) for `run` on this machine.

    With GPU denoisers, each keeps one thread (it mostly launches kernels and encodes PNGs) and a CPU encoder
    takes the other cores. With CPU denoisers, they split all the cores and a CPU encoder gets one thread: a UNet
    step costs far more than a prompt's CLIP pass, so the encoder is soon done, and cores given to it would sit
    idle for the rest of the run (measured: 0.45 s/image on one thread against 0.31 s on two, tiny model). A
    denoiser given every core also writes the bytes `render` writes by default: oneDNN splits its sums by thread
    count, so CPU pixels depend on it."""
    cores = cores or available_cores()
    if denoisers_on_cpu:
        return 1, max(1, cores // denoisers)
    return (max(1, cores - denoisers) if encoder_on_cpu else 1), 1


def yield_cores() -> None:
    """Drop every thread of this process to the lowest CPU priority (nice 19), for good: for a process whose work
    is done but whose exit still costs CPU, beside processes that are still working. On Linux a nice value
    belongs to a thread, so each one is lowered, not only the caller."""
    if not hasattr(os, "setpriority"):
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the whole process, as POSIX means it
        threads = [0]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except OSError:
            pass  # a thread that ended meanwhile
