"""Process level: real encoder and denoiser processes over ipc://, with kills, restarts, slow and bad peers."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import zmq
from cli_process import CliProcess
from conftest import cli_env, hang_bound, short_ipc_endpoint
from process_kit import (
    RENDER,
    Link,
    assert_each_image_once,
    encoder_summary,
    journal_records,
    prompts_file,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture()
def link(cache_dir: Path, tmp_path: Path):
    started = Link(cache_dir, tmp_path)
    yield started
    started.close()


# The encoder holds its last prompt until an image is done: a link that rendered only after encoding would
# never finish (and fail on the hang bound), one that streams shows the order below, on any machine's speed.
HOLD_LAST_PROMPT = ("--fault", "hold_after_records=11")


@pytest.mark.parametrize("first", ["denoiser", "encoder"])
def test_streaming_overlaps_encoding_and_rendering(link: Link, cache_dir: Path, tmp_path: Path, first: str) -> None:
    prompts, out = prompts_file(tmp_path), tmp_path / "out"
    if first == "denoiser":
        denoiser = link.denoiser(out)
        link.wait_ready("denoiser")
        # Alone, it says once where it is looking for an encoder.
        wait_for(lambda: f"waiting for an encoder at {link.endpoint}" in link.log("denoiser"))
        encoder = link.encoder(prompts, *HOLD_LAST_PROMPT)
    else:
        # The denoiser starts after the first prompt is queued and loads while the others encode.
        encoder = link.encoder(prompts, *HOLD_LAST_PROMPT)
        wait_for(lambda: any(r["event"] == "queued" for r in journal_records(cache_dir)))
        denoiser = link.denoiser(out)
    summary = encoder_summary(link, encoder)
    assert denoiser.wait(timeout=hang_bound(120)) == 0, link.log("denoiser")
    assert summary["done"] == 12 and summary["abandoned"] == 0
    assert_each_image_once(out, 12)
    records = journal_records(cache_dir)
    first_done = min(r["t"] for r in records if r["event"] == "done")
    last_queued = max(r["t"] for r in records if r["event"] == "queued")
    assert first_done < last_queued, "the first image must exist before the last prompt is encoded"
    assert link.log("denoiser").count("waiting for an encoder") <= 1


def test_two_denoisers_share_the_work_by_speed(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    prompts, out = prompts_file(tmp_path), tmp_path / "out"
    fast = link.denoiser(out, "--credits", "1", name="fast")
    slow = link.denoiser(out, "--credits", "1", "--fault", "render_delay_s=1.5", name="slow")
    link.wait_ready("fast", "slow")
    summary = encoder_summary(link, link.encoder(prompts))
    assert fast.wait(timeout=hang_bound(120)) == 0 and slow.wait(timeout=hang_bound(120)) == 0
    assert summary["done"] == 12
    done = [r for r in journal_records(cache_dir) if r["event"] == "done"]
    by_pid = {}
    for record in done:
        by_pid[record["worker"]] = by_pid.get(record["worker"], 0) + 1
    assert len(by_pid) == 2, f"both denoisers must render some jobs: {by_pid}"
    assert len({r["job"] for r in done}) == 12 == len(done)
    assert_each_image_once(out, 12)


def test_kill_9_denoiser_with_jobs_in_flight_loses_nothing(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    prompts, out = prompts_file(tmp_path), tmp_path / "out"
    victim = link.denoiser(out, "--credits", "2", "--fault", "render_delay_s=3", name="victim")
    link.wait_ready("victim")
    encoder = link.encoder(prompts)
    wait_for(lambda: any(r["event"] == "dispatched" for r in journal_records(cache_dir)))
    survivor = link.denoiser(out, "--credits", "2", name="survivor")
    link.wait_ready("survivor")
    victim.send_signal(signal.SIGKILL)
    summary = encoder_summary(link, encoder)
    assert survivor.wait(timeout=hang_bound(120)) == 0
    assert summary["done"] == 12 and summary["dead_lettered"] == 0
    records = journal_records(cache_dir)
    assert any(r["event"] == "requeued" for r in records), "the victim's in-flight jobs must be re-queued"
    done = [r for r in records if r["event"] == "done"]
    assert len({r["job"] for r in done}) == 12 == len(done)
    assert_each_image_once(out, 12)


def test_killed_encoder_restarts_and_renders_only_the_missing(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    prompts, out = prompts_file(tmp_path), tmp_path / "out"
    denoiser = link.denoiser(out, "--serve", "--credits", "1")
    link.wait_ready("denoiser")
    first = link.encoder(prompts, "--fault", "encode_delay_s=0.5", name="first")
    wait_for(lambda: len(list(out.glob("*.png"))) >= 3)
    first.send_signal(signal.SIGKILL)
    first.wait()
    rendered_before = len(list(out.glob("*.png")))
    assert rendered_before < 12
    second = encoder_summary(link, link.encoder(prompts, name="second"), name="second")
    assert second["done"] + second["already_done"] == 12
    assert second["already_done"] >= rendered_before - 1  # one may have finished after the kill
    assert_each_image_once(out, 12)
    denoiser.send_signal(signal.SIGTERM)
    assert denoiser.wait(timeout=hang_bound(60)) == 0


def test_bad_peers_are_dropped_and_the_run_completes(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    import pickle

    prompts, out = prompts_file(tmp_path, 4), tmp_path / "out"
    encoder = link.encoder(prompts, "--fault", "encode_delay_s=0.3")
    wait_for(link.bound)  # messages sent before the encoder binds would be dropped with the rogue's socket
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(link.endpoint)
    header = {"proto": "sdxl-split", "v": 3, "type": "HEARTBEAT"}
    for frames in (
        [pickle.dumps({"type": "READY", "credits": 5})],
        [b"\x00\xffgarbage"],
        [json.dumps({**header, "type": "STEAL"}).encode()],
        [json.dumps({**header, "v": 99}).encode()],
        [json.dumps({**header, "type": "DONE", "job_id": "0" * 64, "attempt": 1, "images": [],
                     "seconds": 0}).encode()],
    ):
        rogue.send_multipart(frames)
    wait_for(lambda: link.log("encoder").count("dropped a bad message") >= 4)
    # Over MAXMSGSIZE: zmq drops the whole connection, so it goes last, from its own socket.
    oversized = ctx.socket(zmq.DEALER)
    oversized.setsockopt(zmq.LINGER, 0)
    oversized.connect(link.endpoint)
    from sdxl_split.shared import protocol as p

    oversized.send_multipart([json.dumps(header).encode(), os.urandom(p.DEFAULT_MAX_PAYLOAD + p.MAX_HEADER_BYTES + 1)])
    wait_for(lambda: "closed without a BYE" in link.log("encoder"))
    oversized.close()
    rogue.close()
    ctx.term()
    denoiser = link.denoiser(out)
    summary = encoder_summary(link, encoder)
    assert denoiser.wait(timeout=hang_bound(120)) == 0
    assert summary["done"] == 4
    assert link.log("encoder").count("dropped a bad message") >= 4
    assert "closed without a BYE" in link.log("encoder"), "ZeroMQ's silent drop of the oversized peer must show"
    assert_each_image_once(out, 4)


def test_denoiser_drops_a_job_whose_tensors_break_the_schema(cache_dir: Path, tmp_path: Path) -> None:
    """A fake encoder sends a JOB with wrongly shaped tensors, then a good one; only the good one renders."""
    import torch

    from sdxl_split.shared import protocol as p
    from sdxl_split.shared.embeddings import Embeddings
    from sdxl_split.shared.encoding_settings import EncodingSettings, embedding_key
    from sdxl_split.shared.prompts import PromptEntry

    endpoint = short_ipc_endpoint()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    env = cli_env(cache_dir, SDXL_SPLIT_CONNECT=endpoint)
    out = tmp_path / "out"
    proc = CliProcess(["--model", "tiny", "render", "--out", str(out), *RENDER], env, tmp_path / "denoiser.log")
    try:
        assert router.poll(120_000)
        identity = None
        while identity is None:
            frames = router.recv_multipart()
            if isinstance(p.decode(frames[1:]), p.Ready):
                identity = frames[0]
        entry = PromptEntry(line=1, prompt="a cat")
        settings = EncodingSettings(fingerprint="test", clip_skip=None, dtype="fp32", force_zeros=True)
        key = embedding_key(entry.texts(), settings)
        good = Embeddings(key=key, texts=entry.texts(), settings=settings, tensors={
            "prompt_embeds": torch.randn(1, 77, 96), "negative_prompt_embeds": torch.zeros(1, 77, 96),
            "pooled_prompt_embeds": torch.randn(1, 64), "negative_pooled_prompt_embeds": torch.zeros(1, 64)})
        bad = Embeddings(key=key, texts=entry.texts(), settings=settings,
                         tensors={**good.tensors, "pooled_prompt_embeds": torch.randn(1, 65)})
        job_frames = p.encode(p.Job.build("a" * 64, 1, entry, good))
        router.send_multipart([identity, job_frames[0], bad.to_bytes()])
        router.send_multipart([identity, *job_frames])
        replies = []
        deadline = time.time() + 120
        while not any(isinstance(m, p.Done) for m in replies) and time.time() < deadline:
            # Heartbeat like a real encoder, or a denoiser slowed by a busy machine takes us for dead.
            router.send_multipart([identity, *p.encode(p.Heartbeat())])
            if router.poll(500):
                message = p.decode(router.recv_multipart()[1:])
                if isinstance(message, (p.Done, p.Error)):
                    replies.append(message)
        # The refused JOB is answered, so the encoder can retry it elsewhere instead of holding it forever.
        assert isinstance(replies[0], p.Error) and replies[0].job_id == "a" * 64
        assert "JOB refused" in replies[0].reason and "same shapes" in replies[0].reason
        assert isinstance(replies[-1], p.Done) and len(replies[-1].images) == 1
        router.send_multipart([identity, *p.encode(p.Bye("test over"))])
        assert proc.wait(timeout=hang_bound(60)) == 0, proc.output()[0]
        output = proc.output()[0]
        assert "dropped a bad message from the encoder" in output
    finally:
        if proc.poll() is None:
            proc.kill()
        router.close()
        ctx.term()


def test_stream_pngs_equal_render_prompts_pngs(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    """Fidelity through the link; render --prompts is itself bit-identical to the monolith (test_denoiser)."""
    prompts = prompts_file(tmp_path, 3)
    streamed, from_cache = tmp_path / "streamed", tmp_path / "cached"
    link.denoiser(streamed)
    link.wait_ready("denoiser")
    encoder_summary(link, link.encoder(prompts))
    link.procs[0].wait(timeout=hang_bound(60))
    offline = link.start("render", "--prompts", str(prompts), "--out", str(from_cache), *RENDER, "--threads", "1",
                         name="offline")
    assert offline.wait(timeout=hang_bound(120)) == 0, link.log("offline")
    files = sorted(p.name for p in streamed.glob("*.png"))
    assert files == sorted(p.name for p in from_cache.glob("*.png")) and len(files) == 3
    for name in files:
        assert (streamed / name).read_bytes() == (from_cache / name).read_bytes()


def test_run_spawns_both_sides_and_reports_memory_per_process(cache_dir: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    prompts, out = prompts_file(tmp_path, 4), tmp_path / "out"
    result = run_cli("--model", "tiny", "run", str(prompts), "--out", str(out), *RENDER, "--denoisers", "2",
                     cache=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "denoiser-0" in result.stdout and "denoiser-1" in result.stdout and "encoder" in result.stdout
    assert "peak RSS GiB" in result.stdout
    assert_each_image_once(out, 4)
    again = run_cli("--model", "tiny", "run", str(prompts), "--out", str(out), *RENDER, cache=cache_dir)
    assert again.returncode == 0 and "0 rendered, 4 already done" in again.stdout


def test_a_denoiser_that_fails_every_job_does_not_sink_the_queue(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    """Failed jobs go to denoisers that have not failed them, so one broken GPU costs no prompts."""
    from sdxl_split.shared import protocol as p

    prompts, out = prompts_file(tmp_path, 8), tmp_path / "out"
    healthy = link.denoiser(out, "--credits", "1")
    encoder = link.encoder(prompts)
    ctx = zmq.Context()
    broken = ctx.socket(zmq.DEALER)
    broken.setsockopt(zmq.LINGER, 0)
    broken.connect(link.endpoint)
    broken.send_multipart(p.encode(p.Ready(credits=4, worker="broken", pid=1, device="cpu")))
    failed = 0
    try:
        while encoder.poll() is None:
            if broken.poll(200):
                message = p.decode(broken.recv_multipart())
                if isinstance(message, p.Job):
                    broken.send_multipart(p.encode(p.Error(job_id=message.job_id, attempt=message.attempt,
                                                           reason="broken on purpose")))
                    failed += 1
                elif isinstance(message, p.Heartbeat):
                    broken.send_multipart(p.encode(p.Heartbeat()))
                elif isinstance(message, p.Bye):
                    broken.send_multipart(p.encode(p.Bye("ack")))
    finally:
        broken.close()
        ctx.term()
    summary = encoder_summary(link, encoder)
    assert healthy.wait(timeout=hang_bound(120)) == 0
    assert failed >= 1, "the broken denoiser must have been given work"
    assert summary["done"] == 8 and summary["dead_lettered"] == 0
    assert_each_image_once(out, 8)


def test_rerun_with_other_render_settings_renders_anew(link: Link, cache_dir: Path, tmp_path: Path) -> None:
    """The journal skips a job only for a denoiser whose folder *and* settings made the recorded images."""
    prompts, out = prompts_file(tmp_path, 2), tmp_path / "out"
    link.denoiser(out, name="first-denoiser")
    first = encoder_summary(link, link.encoder(prompts, name="first"), name="first")
    assert first["done"] == 2
    link.procs[0].wait(timeout=hang_bound(60))
    link.denoiser(out, name="same")
    same = encoder_summary(link, link.encoder(prompts, name="again"), name="again")
    assert same["done"] == 0 and same["already_done"] == 2
    link.procs[2].wait(timeout=hang_bound(60))
    link.start("render", "--out", str(out), "--size", "64x64", "--steps", "5", name="other-steps")
    other = encoder_summary(link, link.encoder(prompts, name="third"), name="third")
    assert other["done"] == 2 and other["already_done"] == 0
    assert len(list(out.glob("*.png"))) == 4


@pytest.mark.parametrize("case", ["unknown-key", "wrong-server-key"])
def test_a_curve_key_mismatch_is_named_once_on_each_side(link: Link, cache_dir: Path, tmp_path: Path,
                                                         case: str) -> None:
    """Keys that do not match: ZeroMQ retries quietly forever, so each side says why, once, instead of "closed
    without a BYE" again and again."""
    import shutil

    from sdxl_split.shared.security import create_keys

    ours, theirs = create_keys(tmp_path / "ours", ["gpu1"]), create_keys(tmp_path / "theirs", ["gpu1"])
    keys = theirs.clients["gpu1"].directory
    if case == "unknown-key":  # the right server key, but a client key the encoder never allowed
        shutil.copy(ours.server_public, keys / "server.key")
    said = {"unknown-key": ("refused a denoiser: its CURVE key is not in", "refused this box's CURVE key"),
            "wrong-server-key": ("its server.key is not this encoder's", "server.key is not that encoder's key")}
    encoder_says, denoiser_says = said[case]
    encoder = link.encoder(prompts_file(tmp_path, 2), "--curve", str(ours.encoder_dir), "--wait", "6")
    wait_for(link.bound)
    stranger = link.denoiser(tmp_path / "out", "--curve", str(keys), name="stranger")
    wait_for(lambda: denoiser_says in link.log("stranger"))
    assert encoder.wait(timeout=hang_bound(120)) == 0
    encoder_log, denoiser_log = link.log("encoder"), link.log("stranger")
    assert encoder_log.count(encoder_says) == 1, encoder_log
    assert "closed without a BYE" not in encoder_log
    assert denoiser_log.count(denoiser_says) == 1, denoiser_log
    stranger.kill()
