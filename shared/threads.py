"""CPU threads per process: torch starts one per core in every process, so two processes on one CPU would
fight over the same cores. `run` gives each local process its share; `--threads` sets it by hand."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_threads(count: int | None) -> None:
    """Run torch's intra-op work on `count` threads (None: torch's default, one per core)."""
    if not count:
        return
    import torch

    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:
        pass  # only settable before the first parallel op; the intra-op count is what matters here


def shares(cpu_processes: int, gpu_processes: int, cores: int | None = None) -> tuple[int, int]:
    """(threads for each process computing on the CPU, threads for each one driving a GPU). A GPU process
    mostly launches kernels and encodes PNGs, so it keeps one thread and the CPU-bound ones split the rest."""
    cores = cores or available_cores()
    gpu_threads = 1
    left = max(1, cores - gpu_processes * gpu_threads) if cpu_processes else cores
    return (max(1, left // cpu_processes) if cpu_processes else 0), gpu_threads
