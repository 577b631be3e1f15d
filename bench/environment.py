"""Where a bench ran: hardware, library versions, model identity, date and command line, for the JSON record."""

from __future__ import annotations

import datetime as dt
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

from sdxl_split.shared.devices import cuda_index

GIB = 1024**3


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: str) -> str | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(cuda_index(device))


def environment(device: str, model: dict, argv: list[str], now: dt.datetime | None = None) -> dict:
    """Everything needed to tell two result files apart; `model` holds spec, fingerprint and random_weights."""
    import torch

    now = now or dt.datetime.now().astimezone()
    return {
        "date": now.date().isoformat(),
        "datetime": now.isoformat(timespec="seconds"),
        "device": device,
        "gpu": gpu_name(device),
        "cuda": torch.version.cuda,
        "cpu": cpu_name(),
        "cpu_cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": psutil.virtual_memory().total / GIB,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "sdxl_split": _version("sdxl-split"),
        "model": model,
        "argv": list(argv) if argv else list(sys.argv),
    }


def result_stem(env: dict) -> str:
    """`<gpu-or-cpu>-<YYYY-MM-DD>`, e.g. nvidia-h100-80gb-hbm3-2025-06-01 or cpu-2025-06-01."""
    name = env["gpu"] or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return f"{slug}-{env['date']}"
