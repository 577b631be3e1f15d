"""`run --engine ray` on a local Ray (2 CPUs, tiny model): the same bytes as the ZeroMQ side, resume, a killed
actor, and failures that come back as one line. Skipped where the ray extra is not installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from process_kit import RENDER, assert_each_image_once, manifest, prompts_file

from sdxl_split.shared.faults import KILL_MARKER

pytest.importorskip("ray.data", reason="the ray extra is not installed: pip install -e '.[ray]'")

pytestmark = pytest.mark.slow

# One thread per denoiser on both sides: oneDNN's CPU kernels split their sums by thread count, so pixels are
# only bit-identical between processes that use the same number of threads.
RAY = ["--engine", "ray", "--encoder-cpus", "1", "--denoiser-cpus", "1"]


def run_ray(prompts: Path, out: Path, cache: Path, *extra: str):
    return run_cli("--model", "tiny", "run", str(prompts), "--out", str(out), *RENDER, "--images-per-prompt", "2",
                   *RAY, *extra, cache=cache, timeout=600)


def rows_without_time(out: Path) -> list[dict]:
    return sorted(({k: v for k, v in row.items() if k != "time"} for row in manifest(out)),
                  key=lambda row: row["image_id"])


def test_ray_pngs_and_manifest_equal_render_prompts_and_a_rerun_renders_none(cache_dir: Path, tmp_path: Path):
    prompts, out, offline = prompts_file(tmp_path, 8), tmp_path / "ray", tmp_path / "offline"
    result = run_ray(prompts, out, cache_dir)
    assert result.returncode == 0, result.stderr
    assert "16 images rendered" in result.stdout and "ray start-up:" in result.stdout
    assert "encode " in result.stdout and "denoise " in result.stdout  # the memory table's stage rows
    assert_each_image_once(out, 16)

    cached = run_cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(offline), *RENDER,
                     "--images-per-prompt", "2", "--threads", "1", cache=cache_dir)
    assert cached.returncode == 0, cached.stderr
    for png in out.glob("*.png"):
        assert png.read_bytes() == (offline / png.name).read_bytes(), png.name
    assert rows_without_time(out) == rows_without_time(offline)

    # A line that repeats an earlier one asks for the same images: said once, rendered never.
    prompts.write_text(prompts.read_text() + "prompt number 0, a small watercolor\n")
    again = run_ray(prompts, out, cache_dir)
    assert again.returncode == 0, again.stderr
    assert "16 images already in" in again.stderr and "nothing to render" in again.stdout
    assert "1 line repeating an earlier one (rendered once)" in again.stderr
    assert "starting a local Ray" not in again.stderr


def test_a_killed_denoiser_actor_loses_no_image_and_writes_none_twice(cache_dir: Path, tmp_path: Path):
    """The hook SIGKILLs the actor right after the first image of a two-image job; Ray restarts it and retries
    the job, which finds that image by name and renders only the other."""
    prompts, out = prompts_file(tmp_path, 4), tmp_path / "out"
    result = run_ray(prompts, out, cache_dir, "--fault", "kill_after_images=1")
    assert result.returncode == 0, result.stderr
    assert (out / KILL_MARKER).exists(), "the fault never fired"
    assert "7 images rendered, 1 already there" in result.stdout
    assert_each_image_once(out, 8)
    assert len({row["image_id"] for row in manifest(out)}) == len(manifest(out)) == 8


def test_a_bad_prompt_file_fails_before_ray_starts(cache_dir: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "bad", "seed": -4}\n')
    result = run_ray(prompts, tmp_path / "out", cache_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {prompts}:2")
    assert "Ray" not in result.stderr and "Traceback" not in result.stderr


def test_a_denoiser_without_the_model_fails_with_one_line(cache_dir: Path, tiny_dir: Path, tmp_path: Path):
    """The driver sees a model folder (its config is there); the denoiser actor finds no UNet weights in it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    prompts = prompts_file(tmp_path, 2)
    result = run_cli("--model", str(model), "run", str(prompts), "--out", str(tmp_path / "out"), *RENDER, *RAY,
                     cache=cache_dir, timeout=600)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "denoiser actor" in errors[0] and "unet" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
