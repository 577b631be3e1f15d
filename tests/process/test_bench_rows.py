"""`sdxl-split bench` for real: every row in its own process (tiny model, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from sdxl_split.bench.results import RESULT_FIELDS, STATUSES

# ---- process: every row in its own process --------------------------------------------------------------------

# Each row costs a fresh interpreter: the fewest that cover a crash, a skip, both sides and the monolith.
BENCH_ROWS = "fp32-classic,fp16-sdpa,model-offload,encoder,monolith"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, session_cache: Path) -> dict:
    """One bench over a spread of rows, with fp32-classic's process forced to die after loading."""
    root = tmp_path_factory.mktemp("bench")
    cache = root / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "tiny").symlink_to(session_cache / "models" / "tiny")
    out = root / "results"
    done = run_cli("--model", "tiny", "bench", "--device", "cpu", "--size", "64x64", "--steps", "2", "--images", "2",
                   "--repeats", "2", "--rows", BENCH_ROWS, "--out", str(out), "--compare", "seed", cache=cache,
                   env={"SDXL_SPLIT_BENCH_CRASH_ROW": "fp32-classic"})
    files = sorted(out.iterdir()) if out.is_dir() else []
    payload = json.loads(next(f for f in files if f.suffix == ".json").read_text()) if files else {}
    return {"done": done, "files": files, "payload": payload, "rows": {r["row"]: r for r in payload.get("rows", [])}}


@pytest.mark.slow
def test_each_row_ran_in_its_own_process(bench_run: dict) -> None:
    assert bench_run["done"].returncode == 3, bench_run["done"].stderr  # a row failed, on purpose
    ran = [r for r in bench_run["rows"].values() if r["status"] != "skipped"]
    pids = [r["pid"] for r in ran]
    parent = bench_run["payload"]["parent_pid"]
    assert len(ran) == 4 and len(set(pids)) == len(pids) and parent not in pids and os.getpid() not in pids
    assert all(isinstance(pid, int) for pid in pids)
    assert all(r["parent_pid"] == parent for r in ran if r["status"] == "ok")


@pytest.mark.slow
def test_json_holds_every_field_and_the_environment(bench_run: dict) -> None:
    payload = bench_run["payload"]
    assert set(bench_run["rows"]) == set(BENCH_ROWS.split(","))
    for row in payload["rows"]:
        assert set(RESULT_FIELDS) <= set(row) and row["status"] in STATUSES
    ok = [r for r in payload["rows"] if r["status"] == "ok"]
    for row in ok:
        assert len(row["latencies_ms"]) == 2 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert len(row["cpu_ms"]) == 2 and all(ms > 0 for ms in row["cpu_ms"]) and row["warmup_ms"] > 0
        assert row["memory"]["unit"] == "GiB" and row["memory"]["peak_rss_gib"] > 0 and row["memory"]["phases"]
    phases = {r["row"]: [p["phase"] for p in r["memory"]["phases"]] for r in ok}
    assert phases["encoder"] == ["load", "encode"] and phases["fp16-sdpa"] == ["load", "denoise", "decode"]
    assert phases["monolith"] == ["load", "encode", "denoise", "decode"]
    assert bench_run["rows"]["fp16-sdpa"]["s_per_image"] == pytest.approx(
        bench_run["rows"]["fp16-sdpa"]["median_ms"] / 1000 / 2)
    # The denoiser process never holds a text encoder; the monolith holds everything.
    assert "text_encoder" not in bench_run["rows"]["fp16-sdpa"]["components"]
    assert {"text_encoder", "text_encoder_2", "unet", "vae"} <= set(bench_run["rows"]["monolith"]["components"])
    env = payload["environment"]
    for key in ("gpu", "torch", "diffusers", "transformers", "python", "date", "argv"):
        assert key in env
    assert env["model"]["spec"] == "tiny" and env["model"]["random_weights"] is True
    assert env["model"]["fingerprint"].startswith("sha256:")
    assert payload["split_vs_monolith"]["denoiser_row"] == "fp16-sdpa"
    assert {r["row"] for r in payload["seed"]} == {"fp32-classic", "fp16-sdpa", "model-offload", "monolith"}


@pytest.mark.slow
def test_skipped_and_crashed_rows_are_reported_while_the_others_complete(bench_run: dict) -> None:
    rows = bench_run["rows"]
    assert rows["model-offload"]["status"] == "skipped" and rows["model-offload"]["pid"] is None
    assert "needs --device cuda" in rows["model-offload"]["error"]
    crashed = rows["fp32-classic"]
    assert crashed["status"] == "failed" and "SIGKILL" in crashed["error"] and crashed["exit_code"] == -9
    assert all(rows[r]["status"] == "ok" for r in ("encoder", "fp16-sdpa", "monolith"))
    stdout = bench_run["done"].stdout
    assert "| technique | memory (GiB) | latency (ms) |" in stdout and "CPU latencies are not GPU latencies" in stdout
    assert "FAILED: row process killed by SIGKILL" in stdout and "skipped: --offload model" in stdout
    assert "split (encoder + fp16-sdpa denoiser) = " in stdout and "GiB vs monolith " in stdout
    assert "fp32-classic" in bench_run["done"].stderr  # named among the failed rows


@pytest.mark.slow
def test_markdown_and_chart_files_are_written(bench_run: dict) -> None:
    by_suffix = {f.suffix: f for f in bench_run["files"]}
    assert set(by_suffix) == {".md", ".json", ".png"}
    assert by_suffix[".md"].stem.startswith("cpu-") and by_suffix[".md"].stem == by_suffix[".png"].stem
    assert by_suffix[".md"].read_text() == bench_run["done"].stdout
    with Image.open(by_suffix[".png"]) as chart:
        chart.verify()
    with Image.open(by_suffix[".png"]) as chart:
        assert chart.format == "PNG" and chart.size[0] > 400


@pytest.mark.slow
def test_a_timed_out_encoder_fails_the_denoiser_rows_that_need_its_embeddings(cli, tmp_path: Path) -> None:
    done = cli("--model", "tiny", "bench", "--device", "cpu", "--size", "64x64", "--steps", "1", "--images", "1",
               "--repeats", "1", "--rows", "fp16-sdpa", "--row-timeout", "1", "--out", str(tmp_path))
    assert done.returncode == 3, done.stderr
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {r["row"]: r for r in payload["rows"]}
    assert rows["encoder"]["error"] == "row timed out after 1 s"
    assert rows["encoder"]["note"] == "not selected: run to fill the embedding cache"
    assert rows["fp16-sdpa"]["status"] == "failed" and "encoder row failed" in rows["fp16-sdpa"]["error"]


@pytest.mark.slow
def test_bad_row_ids_are_one_line_user_errors(cli, tmp_path: Path) -> None:
    done = cli("bench", "--rows", "fp16-sdpa,warp-drive", "--out", str(tmp_path / "results"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "unknown row 'warp-drive'" in done.stderr and not (tmp_path / "results").exists()
