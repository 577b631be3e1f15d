"""Device names as users write them (cpu, mps, cuda, cuda:N), parsed in one place; and what this machine has."""

from __future__ import annotations


def cuda_index(device: str) -> int | None:
    """The CUDA device number a --device names, or None for cpu/mps. Raises ValueError for `cuda:x`."""
    if not device.startswith("cuda"):
        return None
    return int(device.split(":", 1)[1]) if ":" in device else 0


def local_cuda_devices() -> int:
    """CUDA devices torch sees in this process. Imports torch (about 1.7 s): call it only where torch is needed
    anyway, or in a child, as `run` does, whose own process never imports it."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
