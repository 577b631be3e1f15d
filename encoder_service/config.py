"""The encoder's settings and its link's, fixed once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdxl_split.shared.liveness import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS


@dataclass(frozen=True)
class EncodeConfig:
    device: str = "cpu"
    dtype: str = "fp32"
    clip_skip: int | None = None
    # 1 keeps the tensors bit-identical to diffusers' one-prompt encode_prompt; larger batches are
    # faster but batched matmuls may differ in the last bit.
    batch_size: int = 1
    # torch CPU threads for this process; None: one per core.
    threads: int | None = None


@dataclass(frozen=True)
class LinkConfig:
    endpoint: str
    # Encoder key folder from `sdxl-split keys init` (server.key_secret + allowed_clients/); None = no CURVE.
    curve_dir: Path | None = None
    # ERRORs a job may get before it is dead-lettered.
    max_attempts: int = 3
    # Seconds a denoiser may hold jobs without finishing one; None: scaled to its own speed (job_table).
    job_timeout_s: float | None = None
    heartbeat_s: float = HEARTBEAT_INTERVAL_S
    liveness: int = HEARTBEAT_LIVENESS
