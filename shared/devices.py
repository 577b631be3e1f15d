"""Device names as users write them (cpu, mps, cuda, cuda:N), parsed in one place."""

from __future__ import annotations


def cuda_index(device: str) -> int | None:
    """The CUDA device number a --device names, or None for cpu/mps. Raises ValueError for `cuda:x`."""
    if not device.startswith("cuda"):
        return None
    return int(device.split(":", 1)[1]) if ":" in device else 0
