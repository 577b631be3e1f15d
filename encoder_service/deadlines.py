"""When a denoiser holding jobs counts as hung: heartbeats come from its main loop, so a render thread stuck in a
CUDA call or a deadlock looks alive; only a deadline on progress catches it."""

from __future__ import annotations

from collections.abc import Iterable

from sdxl_split.encoder_service.job_records import DenoiserRecord

# Deadlines for a job on a denoiser without --job-timeout: the first job may compile for minutes; later ones get
# a generous multiple of that denoiser's slowest job, never less than a floor.
FIRST_JOB_TIMEOUT_S = 1800.0
JOB_TIMEOUT_MULTIPLE = 10.0
JOB_TIMEOUT_FLOOR_S = 120.0


def deadline(denoiser: DenoiserRecord, fixed_s: float | None) -> float:
    """Seconds it may hold jobs without finishing one: --job-timeout, or scaled to its own speed."""
    if fixed_s is not None:
        return fixed_s
    if not denoiser.slowest_job_s:
        return FIRST_JOB_TIMEOUT_S
    return max(JOB_TIMEOUT_FLOOR_S, JOB_TIMEOUT_MULTIPLE * denoiser.slowest_job_s)


def overdue(denoisers: Iterable[DenoiserRecord], now: float,
            fixed_s: float | None) -> list[tuple[DenoiserRecord, float]]:
    late = []
    for denoiser in denoisers:
        if denoiser.inflight and now - denoiser.last_progress > (limit := deadline(denoiser, fixed_s)):
            late.append((denoiser, limit))
    return late
