"""The result record every row carries, whatever became of it, and the one memory figure a run compares by."""

from __future__ import annotations

from sdxl_split.bench.rows import PlannedRow

RESULT_FIELDS = (
    "row", "technique", "side", "status", "note", "seed_technique", "settings", "pid", "parent_pid", "exit_code",
    "error", "warmup_ms", "latencies_ms", "cpu_ms", "median_ms", "min_ms", "max_ms", "s_per_image", "images_per_repeat",
    "memory", "components", "load_avg_1m", "process_s", "log_tail", "phase_ms", "denoise_ms_per_step", "decode_ms",
)
STATUSES = ("ok", "failed", "skipped")


def blank_result(planned: PlannedRow, settings: dict | None) -> dict:
    """Every field present (None where it does not apply), so readers of the JSON never guess."""
    record = dict.fromkeys(RESULT_FIELDS)
    record.update(row=planned.row.id, technique=planned.row.technique, side=planned.row.side, note=planned.note,
                  seed_technique=planned.row.seed_technique, settings=settings, latencies_ms=[], cpu_ms=[],
                  components=[], log_tail=[], phase_ms={})
    return record


def headline_metric(device: str) -> str:
    """The seed's "GB" is torch.cuda.max_memory_allocated; a CPU run has no such thing, so it uses peak RSS."""
    return "cuda_allocated_gib" if device.startswith("cuda") else "peak_rss_gib"


def memory_gib(result: dict, metric: str, after_load: bool = False) -> float | None:
    """The row's peak by `metric`; with after_load, over its work phases only. Loading can peak higher than
    running: on the CPU, fp16 weights on disk are upcast to fp32 while a second copy still exists."""
    memory = result.get("memory") or {}
    if after_load:
        values = [p.get(metric) for p in memory.get("phases", []) if p["phase"] != "load"]
        present = [v for v in values if v is not None]
        value = max(present) if present else None
    else:
        value = memory.get(metric)
    if value is None and metric == "cuda_allocated_gib" and (result.get("settings") or {}).get("device") == "cpu":
        return 0.0  # a row placed on the CPU (the encoder, usually) holds no GPU memory at all
    return value


def metric_label(metric: str) -> str:
    return "GPU allocated" if metric == "cuda_allocated_gib" else "peak RSS"


def workload_ms(result: dict, base_steps: int) -> float | None:
    """The row's median latency for the run's full step count: measured, or, for a row shortened to fit a time
    budget, measured plus its per-step denoise time for each step it skipped."""
    if result["status"] != "ok" or result["median_ms"] is None:
        return None
    steps = (result.get("settings") or {}).get("steps")
    if steps is None or steps == base_steps:
        return result["median_ms"]
    per_step = result.get("denoise_ms_per_step")
    return None if per_step is None else result["median_ms"] + per_step * (base_steps - steps)
