"""Comparisons drawn from finished rows: split (encoder + denoiser) against the monolith, and ours against the seed."""

from __future__ import annotations

from sdxl_split.bench.results import memory_gib, workload_ms
from sdxl_split.bench.rows import SPLIT_DENOISER_ROW
from sdxl_split.bench.seed_table import SEED_BY_TECHNIQUE


def _ok(results: list[dict], row_id: str) -> dict | None:
    return next((r for r in results if r["row"] == row_id and r["status"] == "ok"), None)


def _same_work(denoiser: dict, monolith: dict) -> bool:
    keys = ("device", "dtype", "attention", "vae", "vae_slicing", "offload", "compile", "width", "height", "steps")
    return all(denoiser["settings"].get(k) == monolith["settings"].get(k) for k in keys)


def split_vs_monolith(results: list[dict], metric: str) -> dict | None:
    """Encoder process + the denoiser row holding what the monolith holds (minus text encoders), summed, against
    the monolith process. None unless all three rows finished."""
    encoder, monolith = _ok(results, "encoder"), _ok(results, "monolith")
    if encoder is None or monolith is None:
        return None
    denoiser = _ok(results, SPLIT_DENOISER_ROW)
    if denoiser is None:
        denoiser = next((r for r in results if r["side"] == "denoiser" and r["status"] == "ok"
                         and _same_work(r, monolith)), None)
    if denoiser is None:
        return None
    parts = [memory_gib(encoder, metric), memory_gib(denoiser, metric), memory_gib(monolith, metric)]
    if any(p is None for p in parts):
        return None
    enc, den, mono = parts
    run = [memory_gib(r, metric, after_load=True) for r in (encoder, denoiser, monolith)]
    return {
        "metric": metric,
        "denoiser_row": denoiser["row"],
        "encoder_gib": enc,
        "denoiser_gib": den,
        "split_gib": enc + den,
        "largest_process_gib": max(enc, den),
        "monolith_gib": mono,
        "split_over_monolith": (enc + den) / mono if mono else None,
        "largest_over_monolith": max(enc, den) / mono if mono else None,
        "after_load": None if None in run else {
            "encoder_gib": run[0], "denoiser_gib": run[1], "split_gib": run[0] + run[1], "monolith_gib": run[2],
        },
    }


def seed_comparison(results: list[dict], metric: str, base_steps: int) -> list[dict]:
    """Ours beside the seed's figure for each row that has one, with ours/seed ratios (a row shortened to fewer
    steps compares by its full-step estimate)."""
    rows = []
    for result in results:
        figure = SEED_BY_TECHNIQUE.get(result.get("seed_technique") or "")
        if figure is None:
            continue
        ours_mem = memory_gib(result, metric) if result["status"] == "ok" else None
        ours_ms = workload_ms(result, base_steps)
        rows.append({
            "row": result["row"],
            "seed_technique": figure.technique,
            "seed_memory_gib": figure.memory_gib,
            "seed_latency_ms": figure.latency_ms,
            "memory_gib": ours_mem,
            "latency_ms": ours_ms,
            "memory_ratio": ours_mem / figure.memory_gib if ours_mem is not None else None,
            "latency_ratio": ours_ms / figure.latency_ms if ours_ms is not None else None,
        })
    return rows
