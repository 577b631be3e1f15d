"""LoRAs over the link: a denoiser that lacks a job's LoRA (or has another file by that name) answers ERROR, and the
job goes to one that has it, or is dead-lettered with the reason; it is never rendered without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import hang_bound, run_cli
from process_kit import RENDER, Link, assert_each_image_once, encoder_summary, journal_records, prompts_file

from sdxl_split.shared.models.test_assets import tiny_lora

pytestmark = pytest.mark.slow


@pytest.fixture()
def link(cache_dir: Path, tmp_path: Path):
    started = Link(cache_dir, tmp_path)
    yield started
    started.close()


def lora_dirs(tmp_path: Path) -> tuple[Path, Path]:
    good, other = tmp_path / "good", tmp_path / "other"
    good.mkdir()
    other.mkdir()
    (good / "style.safetensors").write_bytes(tiny_lora("both", seed=1))
    (other / "style.safetensors").write_bytes(tiny_lora("both", seed=2))  # same name, another file
    return good, other


def test_a_job_goes_to_the_denoiser_that_has_its_lora(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    good, other = lora_dirs(tmp_path)
    prompts, out = prompts_file(tmp_path, 4), tmp_path / "out"
    lacking = link.denoiser(out, "--lora-dir", str(other), "--credits", "1", name="lacking")
    encoder = link.encoder(prompts, "--lora", "style:0.8", "--lora-dir", str(good))
    having = link.denoiser(out, "--lora-dir", str(good), "--credits", "1", name="having")
    summary = encoder_summary(link, encoder)
    assert having.wait(timeout=hang_bound(120)) == 0 and lacking.wait(timeout=hang_bound(120)) == 0
    assert summary["done"] == 4 and summary["dead_lettered"] == 0
    failed = [r for r in journal_records(cache_dir) if r["event"] == "failed"]
    assert all("is not on this denoiser" in r["reason"] for r in failed)
    done = {r["worker"].split("[")[1].split("]")[0] for r in journal_records(cache_dir) if r["event"] == "done"}
    assert done == {str(having.pid)}, "only the denoiser with the very same file may render them"
    assert_each_image_once(out, 4)


def test_a_lora_no_denoiser_has_is_dead_lettered_with_the_reason(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    """A missing LoRA is the denoiser's limit, not the job's fault: the job waits --wait seconds for a denoiser that
    has it, then is given up with what the denoisers said."""
    good, other = lora_dirs(tmp_path)
    prompts, out = prompts_file(tmp_path, 2), tmp_path / "out"
    lacking = link.denoiser(out, "--lora-dir", str(other), name="lacking")
    encoder = link.encoder(prompts, "--lora", "style", "--lora-dir", str(good), "--wait", "2")
    assert encoder.wait(timeout=hang_bound(300)) == 3, link.log("encoder")  # 3: some jobs failed
    text = link.log("encoder")
    summary = json.loads(text[text.index("{\n"):])
    assert lacking.wait(timeout=hang_bound(120)) == 0
    assert summary["dead_lettered"] == 2 and summary["done"] == 0
    assert "is not on this denoiser" in link.log("encoder") and not list(out.glob("*.png"))


def test_run_renders_a_lora_given_by_path_from_any_folder(cache_dir: Path, tmp_path: Path) -> None:
    """`run --lora /some/dir/x.safetensors` from another folder: its denoisers are handed the file `run` found."""
    good, _ = lora_dirs(tmp_path)
    prompts, out, elsewhere = prompts_file(tmp_path, 2), tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("--model", "tiny", "run", str(prompts), "--out", str(out), *RENDER,
                     "--lora", f"{good / 'style.safetensors'}:0.7", cache=cache_dir, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert_each_image_once(out, 2)
