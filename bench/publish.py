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
from sdxl_split.shared.errors import UserError

# What must match for two runs' rows to share one table.
_SAME_RUN_KEYS = ("gpu", "device", "date")


def build_payload(env: dict, bench: dict, results: list[dict], compare_seed: bool, parent_pid: int) -> dict:
    """Every raw figure of the run; the markdown and chart are drawn from this alone."""
    metric = headline_metric(env["device"])
    # Table order (the seed's), not run order; each row's pid and the progress lines keep the latter.
    rows = sorted(results, key=lambda result: CATALOGUE_ORDER.get(result["row"], len(CATALOGUE_ORDER)))
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
        "seed": seed_comparison(rows, metric, bench["base"]["steps"]) if compare_seed else None,
    }
    if compare_seed:
        payload["seed_source"] = {"gpu": SEED_GPU, "workload": SEED_WORKLOAD,
                                  "figures": [vars(figure) for figure in SEED_FIGURES]}
    return payload


def results_path(out_dir: Path, env: dict) -> Path:
    return out_dir / f"{result_stem(env)}.json"


def merge_previous(env: dict, bench: dict, results: list[dict], previous_path: Path
                   ) -> tuple[dict, dict, list[dict]]:
    """--append: this run's rows replace the same rows of an earlier run on the same hardware, model and
    workload, and the earlier run's other rows stay. So a suite too long for one sitting is run in parts."""
    if not previous_path.is_file():
        return env, bench, results
    try:
        previous = json.loads(previous_path.read_text())
        old_env, old_bench, old_rows = previous["environment"], previous["bench"], previous["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--append: cannot read {previous_path} ({err}); move it away or drop --append") from None
    mismatched = [key for key in _SAME_RUN_KEYS if old_env.get(key) != env.get(key)]
    if old_env.get("model", {}).get("fingerprint") != env["model"]["fingerprint"]:
        mismatched.append("model")
    same_work = ("width", "height", "steps", "images_per_prompt", "scheduler", "guidance")
    if any(old_bench.get("base", {}).get(key) != bench["base"][key] for key in same_work):
        mismatched.append("workload")
    if old_bench.get("prompts") != bench["prompts"]:
        mismatched.append("prompts")
    if mismatched:
        raise UserError(f"--append: {previous_path} was measured with another {', '.join(mismatched)}; "
                        "use another --out or drop --append")
    ours = {result["row"] for result in results}
    merged_rows = [row for row in old_rows if row["row"] not in ours] + list(results)
    rows = sorted({*old_bench.get("rows", []), *bench["rows"]},
                  key=lambda row: CATALOGUE_ORDER.get(row, len(CATALOGUE_ORDER)))
    merged_bench = {**bench, "rows": rows,
                    "row_steps": {**old_bench.get("row_steps", {}), **bench.get("row_steps", {})},
                    "row_repeats": {**old_bench.get("row_repeats", {}), **bench.get("row_repeats", {})}}
    earlier = old_env.get("runs") or [{"datetime": old_env.get("datetime"), "argv": old_env.get("argv")}]
    merged_env = {**env, "runs": [*earlier, {"datetime": env.get("datetime"), "argv": env.get("argv")}]}
    return merged_env, merged_bench, merged_rows


def write_outputs(payload: dict, out_dir: Path) -> dict[str, Path]:
    stem = out_dir / result_stem(payload["environment"])
    paths = {suffix: stem.with_suffix(f".{suffix}") for suffix in ("md", "json", "png")}
    atomic_write_bytes(paths["json"], (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())
    atomic_write_bytes(paths["md"], markdown(payload).encode())
    write_chart(payload, paths["png"])
    return paths
