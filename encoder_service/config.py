"""The encoder's settings, fixed once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass


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
