"""Timing of one repeat (wall clock, GPU work included, and CPU time), and the latency figures a row reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# Denoising steps of a row's untimed warm-up. CUDA graphs (compile mode reduce-overhead) are recorded over the
# first few calls; three steps cover that.
WARMUP_STEPS = 3


def timed_ms(work: Callable[[], object], device: str) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) for `work`. Waits for queued GPU kernels, so asynchronous launches are not
    mistaken for speed. CPU time over wall time shows how many cores the repeat really had."""
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(torch.device(device))
    started, cpu_started = time.perf_counter(), time.process_time()
    work()
    if cuda:
        torch.cuda.synchronize(torch.device(device))
    return (time.perf_counter() - started) * 1000.0, (time.process_time() - cpu_started) * 1000.0


def latency_stats(latencies_ms: list[float], images_per_repeat: int | None) -> dict:
    """median/min/max over the timed repeats; s/image from the median (None for rows that make no images)."""
    if not latencies_ms:
        return {"median_ms": None, "min_ms": None, "max_ms": None, "s_per_image": None}
    median = statistics.median(latencies_ms)
    return {
        "median_ms": median,
        "min_ms": min(latencies_ms),
        "max_ms": max(latencies_ms),
        "s_per_image": median / 1000.0 / images_per_repeat if images_per_repeat else None,
    }


def phase_figures(phase_ms: dict[str, list[float]], steps: int | None) -> dict:
    """Medians of one repeat's denoising per step and of its decode: what a row shortened to fewer steps still
    compares by."""
    denoise, decode = phase_ms.get("denoise"), phase_ms.get("decode")
    return {
        "denoise_ms_per_step": statistics.median(denoise) / steps if denoise and steps else None,
        "decode_ms": statistics.median(decode) if decode else None,
    }
