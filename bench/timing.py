"""Wall-clock timing of one repeat (GPU work included), and the latency figures a row reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed_ms(work: Callable[[], object], device: str) -> float:
    """Milliseconds for `work`, waiting for queued GPU kernels so asynchronous launches are not mistaken for speed."""
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000.0


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
