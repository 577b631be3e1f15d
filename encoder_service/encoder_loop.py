"""The encoder's loop, on the thread that owns the ROUTER socket: it queues each job the model thread hands over
the moment it exists and serves the denoisers (credits, heartbeats, deadlines) until every job is done.

This is the shape of the denoiser's DenoiserLoop and of vLLM's busy loop: the socket loop owns its thread and
sleeps in one poll on the socket and a wake-up pipe; the model runs on a thread of its own and wakes the loop when it
has something. A front (the prompt file here) only submits requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sdxl_split.encoder_service.dispatcher import Dispatcher
from sdxl_split.encoder_service.encode_pass import EncodeStats
from sdxl_split.encoder_service.model_thread import (
    EncodeRequest,
    EncoderModelThread,
    Handover,
    JobReady,
    ModelThreadFailed,
    RequestFailed,
    RequestFinished,
)
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.jobs import job_id_for
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.text import plural

DRAIN_TIMEOUT_S = 300.0


@dataclass
class FileOutcome:
    """What one prompt file's run came to."""

    encode: EncodeStats
    jobs: int
    already_done: int
    done: int
    dead_lettered: int
    abandoned: int
    denoisers_attached: bool
    interrupted: bool


class EncoderLoop:
    def __init__(self, dispatcher: Dispatcher, model: EncoderModelThread,
                 on_progress: Callable[[int], None] = lambda n: None) -> None:
        self.dispatcher = dispatcher
        self.model = model
        self.on_progress = on_progress

    def _queue(self, ready: JobReady) -> None:
        """A job for an entry whose embeddings are cached; lines that ask for the same work share one."""
        self.on_progress(1)
        job_id = job_id_for(ready.embedding_key, ready.entry.seed, ready.entry.count, ready.loras)
        self.dispatcher.add(job_id, ready.entry, ready.embedding_key, ready.loras)  # a job already there: no-op

    def _handle(self, items: list[Handover]) -> EncodeStats | None:
        """Act on what the model thread handed over; the stats once its request has finished."""
        finished = None
        for item in items:
            if isinstance(item, JobReady):
                self._queue(item)
            elif isinstance(item, RequestFinished):
                finished = item.stats
            elif isinstance(item, RequestFailed):
                raise item.error if item.error is not None else UserError(item.reason)
            elif isinstance(item, ModelThreadFailed):
                raise item.error
        if finished is not None or any(isinstance(item, JobReady) for item in items):
            # Hand the new jobs out now, so the GPU starts while later prompts are still being encoded.
            self.dispatcher.pump(0)
        return finished

    def run_file(self, entries: list[PromptEntry], wait_s: float, stop: threading.Event) -> FileOutcome:
        """Encode (or read from the cache) every entry and serve denoisers until its jobs are done, or no
        denoiser has come within `wait_s` of the encoding finishing, or `stop` is set."""
        self.model.submit(EncodeRequest(tuple(entries)))
        stats = self._serve_until_encoded(stop)
        if not stop.is_set():
            self._serve_until_done(wait_s, stop)
        if stop.is_set():
            self.model.stop_soon()
            stats = stats or self._serve_until_encoded(threading.Event())
            self._drain()
        table = self.dispatcher.table
        counts = table.counts()
        leftovers = table.leftovers()
        for job in leftovers:
            self.dispatcher.journal.log("abandoned", job.job_id, state=job.state.value)
        # A stop that came after the last image left nothing for a re-run: the run is complete, not interrupted.
        unfinished = bool(leftovers) or stats is None or stats.hits + stats.encoded < stats.unique
        return FileOutcome(encode=stats, jobs=len(table.jobs), already_done=table.already_done, done=counts["done"],
                           dead_lettered=counts["dead"], abandoned=len(leftovers),
                           denoisers_attached=table.ever_attached, interrupted=stop.is_set() and unfinished)

    def _serve_until_encoded(self, stop: threading.Event) -> EncodeStats | None:
        heartbeat = self.dispatcher.config.heartbeat_s
        while not stop.is_set():
            stats = self._handle(self.model.take())
            if stats is not None:
                return stats
            self.dispatcher.pump(heartbeat)
        return None

    def _serve_until_done(self, wait_s: float, stop: threading.Event) -> None:
        dispatcher, table = self.dispatcher, self.dispatcher.table
        heartbeat = dispatcher.config.heartbeat_s
        idle_since = time.monotonic()
        while table.outstanding and not stop.is_set():
            # Jobs every attached denoiser refused (a LoRA none of them has) wait like jobs with no denoiser.
            stranded = len(table.stranded()) == table.outstanding
            if table.denoisers and not stranded:
                idle_since = time.monotonic()
                dispatcher.pump(heartbeat)
                continue
            # No denoiser that could take them: wait for one at most wait_s (a denoiser still loading its model
            # heartbeats before READY; that counts as coming), and not a poll timeout longer.
            left = wait_s - (time.monotonic() - max(idle_since, dispatcher.last_peer_seen if not stranded else 0))
            if left < 0:
                table.give_up_stranded()
                return
            dispatcher.pump(min(heartbeat, left))

    def _drain(self) -> None:
        """On Ctrl-C: hand out nothing new, but let images already on a GPU finish and be journaled.
        A second Ctrl-C raises KeyboardInterrupt out of here."""
        dispatcher, table = self.dispatcher, self.dispatcher.table
        table.draining = True
        if table.in_flight:
            dispatcher.report(f"waiting for {plural(table.in_flight, 'image batch', 'image batches')} in flight")
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while table.in_flight and table.denoisers and time.monotonic() < deadline:
            dispatcher.pump(dispatcher.config.heartbeat_s)
