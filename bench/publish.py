"""Assembles a run's JSON payload and writes it under --out as <gpu-or-cpu>-<date>.json, .md and .png."""

from __future__ import annotations

import json
from pathlib import Path

from sdxl_split.bench.chart import write_chart
from sdxl_split.bench.compare import seed_comparison, split_vs_monolith
from sdxl_split.bench.environment import result_stem
from sdxl_split.bench.report import markdown
from sdxl_split.bench.results import headline_metric
from sdxl_split.bench.rows import CATALOGUE_ORDER
from sdxl_split.bench.seed_table import SEED_FIGURES, SEED_GPU, SEED_WORKLOAD
from sdxl_split.shared.atomic import atomic_write_bytes


def build_payload(env: dict, bench: dict, results: list[dict], compare_seed: bool, parent_pid: int) -> dict:
    """Every raw figure of the run; the markdown and chart are drawn from this alone."""
    metric = headline_metric(env["device"])
    # Table order (the seed's), not run order; each row's pid and the progress lines keep the latter.
    rows = sorted(results, key=lambda result: CATALOGUE_ORDER[result["row"]])
    payload = {
        "schema": "sdxl-split/bench",
        "schema_version": 1,
        "environment": env,
        "bench": bench,
        "parent_pid": parent_pid,
        "metric": metric,
        "unit": "GiB",
        "rows": rows,
        "split_vs_monolith": split_vs_monolith(rows, metric),
        "seed": seed_comparison(rows, metric) if compare_seed else None,
    }
    if compare_seed:
        payload["seed_source"] = {"gpu": SEED_GPU, "workload": SEED_WORKLOAD,
                                  "figures": [vars(figure) for figure in SEED_FIGURES]}
    return payload


def write_outputs(payload: dict, out_dir: Path) -> dict[str, Path]:
    stem = out_dir / result_stem(payload["environment"])
    paths = {suffix: stem.with_suffix(f".{suffix}") for suffix in ("md", "json", "png")}
    atomic_write_bytes(paths["json"], (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())
    atomic_write_bytes(paths["md"], markdown(payload).encode())
    write_chart(payload, paths["png"])
    return paths
