"""Faults found by attacking sdxl-split as a supervisor, a hostile peer and an impatient user: each one held here.

Waiting is on events (a file appearing, a process exiting, a line in a log), never on fixed sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from cli_process import forkserver
from conftest import cli_env, hang_bound
from process_kit import Link, assert_each_image_once, encoder_summary, journal_records, prompts_file, wait_for

pytestmark = pytest.mark.slow
RENDER = ["--size", "64x64", "--steps", "4"]


def _resolve_tiny(cache: str) -> None:
    from sdxl_split.shared.models.resolve import resolve_model

    resolve_model("tiny", Path(cache))


def test_processes_racing_to_build_the_builtin_model_all_get_it(tmp_path: Path) -> None:
    racers = [forkserver().Process(target=_resolve_tiny, args=(str(tmp_path),)) for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=hang_bound(120))
    assert [r.exitcode for r in racers] == [0, 0, 0]
    assert (tmp_path / "models" / "tiny" / "sdxl_split_model.json").is_file()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".tiny.building")]


def start_run(cache: Path, tmp_path: Path, prompts: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "sdxl_split.cli", "--model", "tiny", "run", str(prompts),
                             "--out", str(tmp_path / "out"), *RENDER, *extra],
                            env=cli_env(cache), stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, log


def test_sigint_to_run_alone_drains_like_ctrl_c(cache_dir: Path, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 10)
    proc, log = start_run(cache_dir, tmp_path, prompts, "--fault", "render_delay_s=0.8")
    out = tmp_path / "out"
    wait_for(lambda: len(list(out.glob("*.png"))) >= 1, timeout=180)
    os.kill(proc.pid, signal.SIGINT)  # to run alone, as `kill -INT` or a supervisor would
    assert proc.wait(timeout=hang_bound(120)) == 3, log.read_text()
    text = log.read_text()
    # One line, from run itself; its children say nothing of their own, and nobody says "press Ctrl-C".
    assert text.count("stopping:") == 1 and "re-run the same command to finish" in text
    assert "press Ctrl-C" not in text and "SIGTERM" not in text
    assert "re-queu" not in text, "jobs a stopping denoiser hands back are the stop line's story, not news"
    assert 1 <= len(list(out.glob("*.png"))) < 10, "a drain renders what is in flight, not every remaining job"
    assert "terminate called" not in text and "leaked semaphore" not in text
    events = {r["event"] for r in journal_records(cache_dir)}
    assert "abandoned" in events


def test_a_second_sigint_aborts_at_once_without_noise(cache_dir: Path, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 10)
    proc, log = start_run(cache_dir, tmp_path, prompts, "--fault", "render_delay_s=2")
    wait_for(lambda: any(r["event"] == "dispatched" for r in journal_records(cache_dir)), timeout=180)
    os.kill(proc.pid, signal.SIGINT)
    wait_for(lambda: "stopping:" in log.read_text())
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=hang_bound(60)) != 0
    text = log.read_text()
    assert "terminate called" not in text and "leaked semaphore" not in text and "Traceback" not in text
    assert not [p for p in (tmp_path / "out").glob("*.png") if p.stat().st_size == 0]


def test_a_killed_denoiser_costs_nothing_and_run_exits_0_with_a_warning(cache_dir: Path, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 8)
    proc, log = start_run(cache_dir, tmp_path, prompts, "--denoisers", "2", "--fault", "render_delay_s=0.5")
    wait_for(lambda: any(r["event"] == "dispatched" for r in journal_records(cache_dir)), timeout=180)
    dispatched = [r for r in journal_records(cache_dir) if r["event"] == "dispatched"]
    victim_pid = int(dispatched[0]["worker"].split("[")[1].split("]")[0])
    os.kill(victim_pid, signal.SIGKILL)
    assert proc.wait(timeout=hang_bound(180)) == 0, log.read_text()
    text = log.read_text()
    assert "was killed by signal 9 (SIGKILL)" in text and "warning:" in text
    assert "OOM" not in text and "leaked semaphore" not in text
    assert_each_image_once(tmp_path / "out", 8)


def test_run_exits_promptly_when_its_encoder_is_killed(cache_dir: Path, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 8)
    proc, log = start_run(cache_dir, tmp_path, prompts, "--fault", "render_delay_s=1")
    wait_for(lambda: any(r["event"] == "dispatched" for r in journal_records(cache_dir)), timeout=180)
    denoiser_pids = {int(r["worker"].split("[")[1].split("]")[0]) for r in journal_records(cache_dir)
                     if r["event"] == "dispatched"}
    encoder = next(c for c in psutil.Process(proc.pid).children()
                   if c.pid not in denoiser_pids and "resource_tracker" not in " ".join(c.cmdline()))
    encoder.kill()
    proc.wait(timeout=hang_bound(300))
    text = log.read_text()
    assert proc.returncode == 3, text
    assert "encoder stopped before it could report" in text
    # The denoiser heard SIGTERM and left on its own; had run waited out its exit timeout it would have killed it.
    assert "denoiser-0 was killed" not in text, text


@pytest.fixture()
def link(cache_dir: Path, tmp_path: Path):
    started = Link(cache_dir, tmp_path)
    yield started
    started.close()


def test_a_hung_render_is_requeued_to_another_denoiser(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    prompts, out = prompts_file(tmp_path, 6), tmp_path / "out"
    # A deadline far above a tiny job's time (0.1 s): on a loaded 2-core box an 8 s deadline also dropped the
    # healthy denoiser.
    hung = link.denoiser(out, "--credits", "1", "--fault", "hang_on_render=1", name="hung")
    encoder = link.encoder(prompts, "--job-timeout", "20")
    wait_for(lambda: any(r["event"] == "dispatched" for r in journal_records(cache_dir)), timeout=180)
    healthy = link.denoiser(out, "--credits", "1", name="healthy")
    summary = encoder_summary(link, encoder)
    assert healthy.wait(timeout=hang_bound(120)) == 0
    assert summary["done"] == 6 and summary["dead_lettered"] == 0
    assert "made no progress on its 1 job for 20 s" in link.log("encoder")
    assert hung.poll() is None or hung.returncode != 0, "the hung process itself cannot be saved, only its jobs"
    assert_each_image_once(out, 6)


def test_run_refuses_a_textual_inversion_named_after_a_clip_word_with_exit_2(cache_dir: Path, tmp_path: Path) -> None:
    """Bad input is exit 2 and one line, never exit 3 and "re-run the same command", even when the encoder child
    is the one that finds it."""
    from sdxl_split.shared.models.test_assets import tiny_embedding

    embedding = tmp_path / "cat.safetensors"
    embedding.write_bytes(tiny_embedding(seed=1))
    prompts = prompts_file(tmp_path, 2)
    proc, log = start_run(cache_dir, tmp_path, prompts, "--embedding", str(embedding))
    assert proc.wait(timeout=hang_bound(300)) == 2, log.read_text()
    text = log.read_text()
    assert "'cat' (the file's name) is already a word CLIP knows; rename the file" in text
    assert "re-run" not in text and "Traceback" not in text
