"""The encoder's link loop is event-driven: a prompt that finishes encoding on the model thread is queued at once,
not when the socket poll next times out. A text side that returns instantly shows it: fifty prompts take a
fraction of one poll timeout each, where waiting for the timeout would cost fifty of them. And a stop that comes
after the last image leaves a complete run, not an interrupted one."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import zmq

from sdxl_split.encoder_service.config import LinkConfig
from sdxl_split.encoder_service.dispatcher import Dispatcher
from sdxl_split.encoder_service.encode_pass import EncodeContext
from sdxl_split.encoder_service.encoder_loop import EncoderLoop
from sdxl_split.encoder_service.journal import Journal
from sdxl_split.encoder_service.model_thread import EncodeRequest, EncoderModelThread, RequestFailed
from sdxl_split.encoder_service.service import cache_fetch
from sdxl_split.encoder_service.text_side import EncodedPrompt
from sdxl_split.shared import protocol as p
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.prompts import PromptEntry

# Long, so that a loop waiting for it (50 x 10 s) and one that does not (milliseconds) are far apart on any box.
POLL_S = 10.0
PROMPTS = 50


class InstantTextSide:
    """Returns right away, so all the time measured is the loop's own."""

    max_clip_skip = 3

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[str] = set()

    def encode(self, batch: list[PromptEntry], clip_skip: int | None) -> list[EncodedPrompt]:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return [EncodedPrompt(tensors={"prompt_embeds": torch.zeros(1, 77, 32),
                                       "negative_prompt_embeds": torch.zeros(1, 77, 32),
                                       "pooled_prompt_embeds": torch.zeros(1, 32),
                                       "negative_pooled_prompt_embeds": torch.zeros(1, 32)},
                              dropped={}) for _ in batch]

    def use_loras(self, loras: tuple) -> None:
        pass


def test_finished_prompts_are_queued_without_waiting_for_the_poll_timeout(tmp_path: Path) -> None:
    text_side = InstantTextSide()
    entries = [PromptEntry(line=n + 1, prompt=f"prompt {n}") for n in range(PROMPTS)]
    settings = EncodingSettings(fingerprint="test", clip_skip=None, dtype="fp32", force_zeros=False)
    link = LinkConfig(endpoint=f"ipc://{tempfile.mkdtemp(prefix='sxs-')}/link.ipc", heartbeat_s=POLL_S)
    cache = EmbeddingCache(tmp_path / "embeddings")
    meter = MemoryMeter()
    dispatcher = Dispatcher(link, Journal(tmp_path / "journal.jsonl"), cache_fetch(cache), report=lambda m: None)
    model = EncoderModelThread(EncodeContext(settings, cache, meter), lambda: text_side, dispatcher.wakeup)
    started = time.perf_counter()
    try:
        outcome = EncoderLoop(dispatcher, model).run_file(entries, wait_s=0.0, stop=threading.Event())
    finally:
        model.close()
        meter.close()
        dispatcher.close()
    seconds = time.perf_counter() - started
    assert outcome.encode.encoded == PROMPTS and text_side.calls == PROMPTS and outcome.jobs == PROMPTS
    # Every forward pass ran on the model thread, none on the thread that owns the socket.
    assert text_side.threads == {"text-model"}
    # Each encode (and the load before them) wakes the link loop; a loop that slept through the poll timeout
    # would take PROMPTS * POLL_S = 500 s. Five timeouts' worth leaves room for a loaded machine.
    assert seconds < 5 * POLL_S, f"{PROMPTS} instant encodes took {seconds:.1f} s"


def instant_denoiser(endpoint: str, stop: threading.Event) -> None:
    """A peer that answers every job at once with one image, until the encoder says BYE."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(p.encode(p.Ready(credits=2, worker="instant", pid=1, device="cpu")))
        while not stop.is_set():
            if not sock.poll(100):
                continue
            message = p.decode(sock.recv_multipart())
            if isinstance(message, p.Bye):
                return
            if isinstance(message, p.Job):
                image = p.ImageDone(file=f"{message.job_id[:16]}.png", sha256=message.job_id[:64].ljust(64, "0"))
                sock.send_multipart(p.encode(p.Done(job_id=message.job_id, attempt=message.attempt,
                                                    images=(image,), seconds=0.01)))


def test_a_stop_after_the_last_image_leaves_a_complete_run(tmp_path: Path) -> None:
    entries = [PromptEntry(line=n + 1, prompt=f"prompt {n}") for n in range(4)]
    settings = EncodingSettings(fingerprint="test", clip_skip=None, dtype="fp32", force_zeros=False)
    link = LinkConfig(endpoint=f"ipc://{tempfile.mkdtemp(prefix='sxs-')}/link.ipc", heartbeat_s=0.2)
    stop, done = threading.Event(), []

    def on_event(event: str, job_id: str, fields: dict) -> None:
        done.extend([job_id] if event == "done" else [])
        if len(done) == len(entries):
            stop.set()  # Ctrl-C, just after the last image

    cache, meter = EmbeddingCache(tmp_path / "embeddings"), MemoryMeter()
    dispatcher = Dispatcher(link, Journal(tmp_path / "journal.jsonl"), cache_fetch(cache), report=lambda m: None,
                            on_event=on_event)
    model = EncoderModelThread(EncodeContext(settings, cache, meter), InstantTextSide, dispatcher.wakeup)
    peer_stop = threading.Event()
    peer = threading.Thread(target=instant_denoiser, args=(link.endpoint, peer_stop), daemon=True)
    peer.start()
    try:
        outcome = EncoderLoop(dispatcher, model).run_file(entries, wait_s=60.0, stop=stop)
    finally:
        model.close()
        meter.close()
        dispatcher.close()
        peer_stop.set()
        peer.join()
    assert stop.is_set() and outcome.done == len(entries) and outcome.abandoned == 0
    assert not outcome.interrupted, "nothing was left for a re-run, so the run is complete (exit 0)"


class BrokenTextSide(InstantTextSide):
    """Loads, then fails every encode with a bug's exception (no bad input explains it)."""

    def encode(self, batch: list[PromptEntry], clip_skip: int | None) -> list[EncodedPrompt]:
        raise IndexError("tuple index out of range")


def test_a_bug_while_encoding_fails_its_request_and_the_model_thread_goes_on(tmp_path: Path) -> None:
    """A server must survive one request's bug; a prompt file's run raises it (EncoderLoop), as before."""
    settings = EncodingSettings(fingerprint="test", clip_skip=None, dtype="fp32", force_zeros=False)
    handed = threading.Event()
    meter = MemoryMeter()
    model = EncoderModelThread(EncodeContext(settings, EmbeddingCache(tmp_path / "embeddings"), meter),
                               BrokenTextSide, SimpleNamespace(set=handed.set))
    try:
        failed = []
        for tag in ("first", "second"):
            model.submit(EncodeRequest((PromptEntry(line=1, prompt=f"a {tag} fox"),), tag=tag))
            while not failed or failed[-1].tag != tag:
                assert handed.wait(60), "the model thread went quiet"
                handed.clear()
                failed += model.take()
        assert [(item.tag, type(item.error)) for item in failed] == [("first", IndexError), ("second", IndexError)]
        assert all(isinstance(item, RequestFailed) and "internal error: IndexError" in item.reason for item in failed)
    finally:
        model.close()
        meter.close()
