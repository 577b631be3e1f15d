"""Per-process memory meter: peak RSS, CUDA allocated/reserved and NVML usage, per named phase, in GiB."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import psutil

GIB = 1024**3


@dataclass(frozen=True)
class PhaseMemory:
    """Peaks within one phase. GiB = 1024**3 bytes (the seed's "GB" is max_memory_allocated / 1024**3)."""

    phase: str
    seconds: float
    peak_rss_gib: float
    cuda_allocated_gib: float | None = None
    cuda_reserved_gib: float | None = None
    nvml_gib: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _ru_maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB. It is the kernel's own high-water mark, so no spike is missed.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _NvmlProbe:
    """This process's GPU memory as the driver sees it (includes the CUDA context torch does not count)."""

    def __init__(self, device_index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._pid = os.getpid()
        # "process" while the driver lists this pid; "device" once it does not. In a container the driver
        # reports host pids, so the device's whole use is the nearest figure there is; the report says which.
        self.scope = "process"

    def used_bytes(self) -> int:
        for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if proc.pid == self._pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        if self._has_context():
            self.scope = "device"
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        return 0

    @staticmethod
    def _has_context() -> bool:
        import torch

        return torch.cuda.is_initialized()


class MemoryMeter:
    """Samples RSS (and NVML) on a background thread; reads torch's CUDA peaks at phase boundaries."""

    def __init__(self, cuda_device: int | None = None, interval_s: float = 0.02) -> None:
        self.cuda_device = cuda_device
        self.phases: list[PhaseMemory] = []
        self._process = psutil.Process()
        self._interval = interval_s
        self._lock = threading.Lock()
        self._peak_rss = 0
        self._peak_nvml = 0
        self._nvml: _NvmlProbe | None = None
        if cuda_device is not None:
            try:
                self._nvml = _NvmlProbe(cuda_device)
            except Exception:  # nvidia-ml-py missing or no driver access: NVML column stays empty
                self._nvml = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_forever, name="memory-meter", daemon=True)
        self._thread.start()

    def _sample_forever(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        rss = self._process.memory_info().rss
        nvml = self._nvml.used_bytes() if self._nvml else 0
        with self._lock:
            self._peak_rss = max(self._peak_rss, rss)
            self._peak_nvml = max(self._peak_nvml, nvml)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        import torch

        cuda = self.cuda_device is not None and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize(self.cuda_device)
            torch.cuda.reset_peak_memory_stats(self.cuda_device)
        with self._lock:
            self._peak_rss = self._process.memory_info().rss
            self._peak_nvml = 0
        ru_before = _ru_maxrss_bytes()
        started = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.cuda_device)
            self._sample()
            seconds = time.perf_counter() - started
            ru_after = _ru_maxrss_bytes()
            with self._lock:
                peak_rss = max(self._peak_rss, ru_after if ru_after > ru_before else 0)
                nvml = self._peak_nvml
            self.phases.append(
                PhaseMemory(
                    phase=name,
                    seconds=seconds,
                    peak_rss_gib=peak_rss / GIB,
                    cuda_allocated_gib=torch.cuda.max_memory_allocated(self.cuda_device) / GIB if cuda else None,
                    cuda_reserved_gib=torch.cuda.max_memory_reserved(self.cuda_device) / GIB if cuda else None,
                    nvml_gib=nvml / GIB if self._nvml else None,
                )
            )

    def summary(self) -> dict:
        """Per-phase peaks merged by phase name, plus the process-wide peaks."""
        merged: dict[str, PhaseMemory] = {}
        for p in self.phases:
            seen = merged.get(p.phase)
            merged[p.phase] = p if seen is None else PhaseMemory(
                phase=p.phase,
                seconds=seen.seconds + p.seconds,
                peak_rss_gib=max(seen.peak_rss_gib, p.peak_rss_gib),
                cuda_allocated_gib=_max_opt(seen.cuda_allocated_gib, p.cuda_allocated_gib),
                cuda_reserved_gib=_max_opt(seen.cuda_reserved_gib, p.cuda_reserved_gib),
                nvml_gib=_max_opt(seen.nvml_gib, p.nvml_gib),
            )
        phases = [m.as_dict() for m in merged.values()]
        return {
            "unit": "GiB",
            "pid": os.getpid(),
            "peak_rss_gib": _ru_maxrss_bytes() / GIB,
            "cuda_allocated_gib": _max_opt(*(m.cuda_allocated_gib for m in merged.values())),
            "cuda_reserved_gib": _max_opt(*(m.cuda_reserved_gib for m in merged.values())),
            "nvml_gib": _max_opt(*(m.nvml_gib for m in merged.values())),
            "nvml_scope": self._nvml.scope if self._nvml else None,
            "phases": phases,
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def _max_opt(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def format_memory_line(summary: dict) -> str:
    parts = [f"peak RSS {summary['peak_rss_gib']:.2f} GiB"]
    if summary.get("cuda_allocated_gib") is not None:
        parts.append(f"CUDA allocated {summary['cuda_allocated_gib']:.2f} GiB")
        parts.append(f"reserved {summary['cuda_reserved_gib']:.2f} GiB")
    if summary.get("nvml_gib") is not None:
        parts.append(f"NVML {summary['nvml_gib']:.2f} GiB")
    phases = ", ".join(f"{p['phase']} {p['peak_rss_gib']:.2f}" + (
        f"/{p['cuda_allocated_gib']:.2f}" if p.get("cuda_allocated_gib") is not None else ""
    ) for p in summary["phases"])
    return "; ".join(parts) + (f" (per phase: {phases})" if phases else "")
