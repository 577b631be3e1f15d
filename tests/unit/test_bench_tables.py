"""`sdxl-split bench` without running a row: planning, budgets, merging, reports and comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxl_split.bench.compare import seed_comparison, split_vs_monolith
from sdxl_split.bench.job import RowTask, source_dict
from sdxl_split.bench.launcher import _death_reason
from sdxl_split.bench.limits import reading
from sdxl_split.bench.publish import merge_previous
from sdxl_split.bench.report import markdown
from sdxl_split.bench.results import blank_result, workload_ms
from sdxl_split.bench.rows import ROW_BY_ID, ROWS, parse_row_values, plan_row, select_rows
from sdxl_split.bench.targets import target_lines
from sdxl_split.bench.timing import latency_stats, phase_figures
from sdxl_split.denoiser_service.config import RenderConfig, validate
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.models.resolve import ModelSource

CPU_BASE = RenderConfig(device="cpu", width=64, height=64, steps=2, images_per_prompt=2)


# ---- unit: rows, job records, figures -------------------------------------------------------------------------


def test_select_rows_keeps_the_order_given_and_refuses_unknown_ids() -> None:
    assert select_rows("all") == ROWS
    assert [r.id for r in select_rows("monolith, encoder,fp16-sdpa,encoder")] == ["monolith", "encoder", "fp16-sdpa"]
    with pytest.raises(UserError, match="unknown row 'fp8'.*fp32-classic"):
        select_rows("fp16-sdpa,fp8")


def test_every_row_runs_as_defined_on_a_gpu() -> None:
    gpu_base = RenderConfig(device="cuda", width=1024, height=1024)
    for row in ROWS:
        planned = plan_row(row, gpu_base, cuda_available=True)
        assert planned.skip_reason is None and planned.note == ""
        if row.side != "encoder":
            assert all(getattr(planned.config, key) == value for key, value in row.overrides.items())


def test_cpu_plan_runs_half_precision_in_fp32_and_skips_what_needs_a_gpu_with_validates_reason() -> None:
    fp16 = plan_row(ROW_BY_ID["fp16-sdpa"], CPU_BASE, cuda_available=False)
    assert fp16.skip_reason is None and fp16.config.dtype == "fp32" and fp16.note == "fp32 on cpu (row is fp16)"
    fp32 = plan_row(ROW_BY_ID["fp32-classic"], CPU_BASE, cuda_available=False)
    assert fp32.note == "" and fp32.config.attention == "default"
    offload = plan_row(ROW_BY_ID["model-offload"], CPU_BASE, cuda_available=False)
    with pytest.raises(UserError) as err:
        validate(offload.config, False)
    assert offload.skip_reason == str(err.value) and "needs --device cuda" in offload.skip_reason
    assert "CUDA graphs" in plan_row(ROW_BY_ID["compile"], CPU_BASE, False).skip_reason
    assert plan_row(ROW_BY_ID["encoder"], CPU_BASE, False).config is None


def test_row_job_round_trips_through_json() -> None:
    source = ModelSource(spec="tiny", kind="folder", location="/m/tiny", config_dir=Path("/m/tiny"),
                         random_weights=True)
    job = RowTask(row_id="tiny-vae", side="denoiser", source=source_dict(source), cache_dir="/c", prompts=("a", "b"),
                 encoding={"fingerprint": "sha256:x", "clip_skip": None, "dtype": "fp32", "force_zeros": True},
                 encoder_device="cpu", render=CPU_BASE.as_dict(), repeats=2)
    again = RowTask.from_json(job.to_json())
    assert again == job and again.render_config() == CPU_BASE and again.model_source() == source
    assert [e.prompt for e in again.entries()] == ["a", "b"]


def test_latency_stats_and_death_reasons() -> None:
    assert latency_stats([30.0, 10.0, 20.0], 4) == {"median_ms": 20.0, "min_ms": 10.0, "max_ms": 30.0,
                                                    "s_per_image": 0.005}
    assert latency_stats([5.0], None)["s_per_image"] is None
    assert "SIGKILL" in _death_reason(-9, []) and "out of memory" in _death_reason(-9, [])
    assert _death_reason(1, ["Traceback", "ValueError: boom"]).endswith("code 1: ValueError: boom")


def _ok(row: str, rss: float, ms: float, device: str = "cpu", **settings) -> dict:
    planned = plan_row(ROW_BY_ID[row], RenderConfig(device=device), False)
    record = blank_result(planned, {"device": device, **settings})
    record.update(status="ok", median_ms=ms, memory={"peak_rss_gib": rss, "cuda_allocated_gib": None})
    return record


def test_split_against_monolith_and_seed_ratios() -> None:
    results = [_ok("encoder", 1.0, 10.0), _ok("fp16-sdpa", 3.0, 100.0), _ok("monolith", 5.0, 120.0)]
    split = split_vs_monolith(results, "peak_rss_gib")
    assert split["split_gib"] == 4.0 and split["largest_process_gib"] == 3.0 and split["split_over_monolith"] == 0.8
    assert split["after_load"] is None  # no per-phase figures in these records
    assert split_vs_monolith(results[1:], "peak_rss_gib") is None
    for record, load, work in zip(results, (1.0, 3.0, 5.0), (0.5, 2.0, 4.0)):
        record["memory"]["phases"] = [{"phase": "load", "peak_rss_gib": load},
                                      {"phase": "denoise", "peak_rss_gib": work}]
    assert split_vs_monolith(results, "peak_rss_gib")["after_load"] == {
        "encoder_gib": 0.5, "denoiser_gib": 2.0, "split_gib": 2.5, "monolith_gib": 4.0}
    # On a GPU run an encoder placed on the CPU counts as holding no GPU memory.
    gpu = [_ok("encoder", 1.0, 10.0), _ok("fp16-sdpa", 3.0, 100.0, "cuda"), _ok("monolith", 5.0, 120.0, "cuda")]
    for record in gpu[1:]:
        record["memory"]["cuda_allocated_gib"] = record["memory"]["peak_rss_gib"] / 2
    assert split_vs_monolith(gpu, "cuda_allocated_gib")["split_gib"] == 1.5
    seed = {row["row"]: row for row in seed_comparison(results, "peak_rss_gib", 25)}
    assert set(seed) == {"fp16-sdpa", "monolith"}
    assert seed["monolith"]["seed_memory_gib"] == 21.72 and seed["monolith"]["latency_ratio"] == 120.0 / 11413.0


def test_markdown_header_rows_and_skip_reasons() -> None:
    skipped = blank_result(plan_row(ROW_BY_ID["model-offload"], CPU_BASE, False), {"device": "cpu"})
    skipped.update(status="skipped", error="--offload model moves weights | needs --device cuda")
    rows = [_ok("fp16-sdpa", 3.0, 100.0), skipped]
    env = {"device": "cpu", "gpu": None, "cpu": "x86", "cpu_cores": 2, "date": "2025-01-02", "torch": "2",
           "diffusers": "0.42", "transformers": "5", "python": "3.11",
           "model": {"spec": "tiny", "random_weights": True, "fingerprint": "sha256:ab"}}
    bench = {"base": CPU_BASE.as_dict(), "prompts": ["p"], "repeats": 2, "encoder_device": "cpu"}
    text = markdown({"environment": env, "bench": bench, "metric": "peak_rss_gib", "rows": rows,
                     "split_vs_monolith": None, "seed": None})
    assert "CPU latencies are not GPU latencies" in text and "random weights" in text
    assert "| technique | memory (GiB) | latency (ms) |" in text
    assert "| `fp16-sdpa` fp16 + SDPA (baseline) | — | 100.0 |" in text
    assert "skipped: --offload model moves weights \\| needs --device cuda" in text


def test_rows_shortened_to_fit_a_budget_say_so_and_compare_by_their_per_step_figure() -> None:
    assert parse_row_values(("fp32-classic=3", "compile=1"), "--row-steps") == {"fp32-classic": 3, "compile": 1}
    for bad, message in (("warp=3", "unknown row 'warp'"), ("compile=x", "must look like ROW=N"),
                         ("compile=0", "at least 1")):
        with pytest.raises(UserError, match=message):
            parse_row_values((bad,), "--row-steps")
    gpu_base = RenderConfig(device="cuda", steps=25)
    short = plan_row(ROW_BY_ID["sequential-offload"], gpu_base, True, steps=5)
    assert short.config.steps == 5 and short.note == "5 of 25 steps, to fit the time budget"
    record = blank_result(short, short.config.as_dict())
    record.update(status="ok", median_ms=6000.0, denoise_ms_per_step=1000.0)
    assert workload_ms(record, 25) == 6000.0 + 20 * 1000.0
    full = _ok("fp16-sdpa", 1.0, 4000.0, steps=25)
    assert workload_ms(full, 25) == 4000.0
    assert phase_figures({"denoise": [300.0, 100.0, 200.0], "decode": [50.0]}, 10) == {
        "denoise_ms_per_step": 20.0, "decode_ms": 50.0}


def _payload(rows: list[dict], device: str = "cuda", steps: int = 25) -> tuple[dict, dict]:
    env = {"gpu": "NVIDIA H200", "device": device, "date": "2026-11-26", "datetime": "t", "argv": ["a"],
           "model": {"fingerprint": "sha256:ab"}}
    bench = {"rows": [r["row"] for r in rows], "base": RenderConfig(device=device, steps=steps).as_dict(),
             "prompts": ["p"], "row_steps": {}, "row_repeats": {}}
    return env, bench


def test_append_merges_rows_of_the_same_workload_and_refuses_another(tmp_path: Path) -> None:
    first = [_ok("fp16-sdpa", 1.0, 4000.0), _ok("monolith", 1.0, 4100.0)]
    env, bench = _payload(first)
    previous = tmp_path / "nvidia-h200-2026-11-26.json"
    previous.write_text(json.dumps({"environment": env, "bench": bench, "rows": first}))
    second = [_ok("fp16-sdpa", 1.0, 3900.0), _ok("compile", 1.0, 3500.0)]
    env2, bench2 = _payload(second)
    merged_env, merged_bench, rows = merge_previous(env2, bench2, second, previous)
    by_row = {r["row"]: r["median_ms"] for r in rows}
    assert by_row == {"monolith": 4100.0, "fp16-sdpa": 3900.0, "compile": 3500.0}
    assert merged_bench["rows"] == ["fp16-sdpa", "compile", "monolith"] and len(merged_env["runs"]) == 2
    _, other = _payload(second, steps=20)
    with pytest.raises(UserError, match="another workload"):
        merge_previous(env2, other, second, previous)
    assert merge_previous(env2, bench2, second, tmp_path / "absent.json") == (env2, bench2, second)


def test_reading_against_the_physical_limit_uses_the_fastest_row() -> None:
    rows = [_ok("fp16-sdpa", 1.0, 4000.0, "cuda", steps=25), _ok("fast-compile-tiny", 1.0, 3000.0, "cuda", steps=25)]
    rows[1]["denoise_ms_per_step"] = 120.0
    env, bench = _payload(rows)
    bench["base"] = {**bench["base"], "width": 1024, "height": 1024, "images_per_prompt": 4}
    text = "\n".join(reading({"environment": env, "bench": bench, "rows": rows}))
    assert "= 1,352 TFLOP per repeat" in text and "1.71 s" in text
    assert "fastest row `fast-compile-tiny`: 3.00 s" in text and "451 TFLOP/s, 1.75x the floor" in text
    assert "120.0 ms per step = 451 TFLOP/s" in text and "10.30 s: 3.4x ours" in text
    cpu_env, cpu_bench = _payload(rows, device="cpu")
    assert reading({"environment": cpu_env, "bench": cpu_bench, "rows": rows}) == []


def test_targets_say_met_missed_or_not_run_for_the_seed_workload_on_a_gpu() -> None:
    def gpu_row(row: str, gib: float, ms: float) -> dict:
        record = _ok(row, 1.0, ms, "cuda", steps=25)
        record["memory"]["cuda_allocated_gib"] = gib
        return record

    rows = [gpu_row("fp16-sdpa", 21.2, 4250.0), gpu_row("monolith", 22.8, 4270.0),
            gpu_row("tiny-vae-slicing", 6.18, 3800.0), gpu_row("group-offload-tiny", 1.42, 5320.0),
            gpu_row("fast-compile-tiny-fp8", 7.0, 2450.0)]
    env, bench = _payload(rows)
    bench["base"] = {**bench["base"], "width": 1024, "height": 1024, "images_per_prompt": 4}
    text = "\n".join(target_lines({"environment": env, "bench": bench, "rows": rows,
                                   "metric": "cuda_allocated_gib"}))
    assert "| best row <= 2.5 s | `fast-compile-tiny-fp8` 2.45 s | met |" in text
    assert "| `tiny-vae-slicing` <= 6.0 GiB allocated | 6.18 GiB | missed |" in text
    assert "| `tiny-vae-slicing-unet-batch` <= 6.0 GiB allocated | `tiny-vae-slicing-unet-batch` not run | not run |" \
        in text
    assert "| `group-offload-tiny` <= 1.5 GiB | 1.42 GiB | met |" in text
    assert "latency | 1.40x | met |" in text
    assert "the monolith's latency | 0.995x | met |" in text
    assert "| 1.60 GiB less | met |" in text
    cpu_env, cpu_bench = _payload(rows, device="cpu")
    assert target_lines({"environment": cpu_env, "bench": cpu_bench, "rows": rows, "metric": "peak_rss_gib"}) == []


def test_fast_options_refuse_what_cannot_work() -> None:
    with pytest.raises(UserError, match="--fuse-qkv .* --attention default"):
        validate(RenderConfig(fuse_qkv=True, attention="default"), False)
    with pytest.raises(UserError, match="--quantize int8 cannot be combined with --offload group"):
        validate(RenderConfig(device="cuda", offload="group", quantize="int8"), True)
    with pytest.raises(UserError, match="--quantize must be one of none, int8, fp8"):
        validate(RenderConfig(quantize="int4"), False)
    with pytest.raises(UserError, match="torchao does for bf16 weights only; add --dtype bf16 \\(not fp16\\)"):
        validate(RenderConfig(device="cuda", dtype="fp16", quantize="fp8"), True)
    validate(RenderConfig(device="cuda", dtype="bf16", quantize="fp8"), True)
    validate(RenderConfig(device="cuda", dtype="fp16", quantize="int8"), True)
    with pytest.raises(UserError, match="--offload-group-mib sizes the groups of --offload group"):
        validate(RenderConfig(device="cuda", offload="model", offload_group_mib=64), True)
    validate(RenderConfig(device="cuda", offload="group", offload_group_mib=0), True)
    assert RenderConfig(offload="group").offload_group_bytes() == 128 * 2**20
    assert RenderConfig(offload="group", offload_group_mib=0).offload_group_bytes() == 0
    with pytest.raises(UserError, match="--compile-vae cannot be combined with --offload group"):
        validate(RenderConfig(device="cuda", compile_vae=True, offload="group"), True)
    fast = RenderConfig(channels_last=True, fuse_qkv=True, compile_vae=True)
    validate(fast, False)
    assert fast.pixel_settings() != RenderConfig().pixel_settings()
