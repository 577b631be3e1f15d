"""The encoder serving requests that arrive at any time (the HTTP server's) instead of one prompt file: the same
dispatcher and model thread, on the thread that owns the ROUTER socket, for as long as the server runs.

A front hands over Generations from any thread (`submit`, `cancel`); each becomes encode requests for the model
thread, then jobs for the denoisers. What becomes of each job (its steps, its images, its failure) goes back to
the request's listener, on this loop's thread. One job may serve several requests that asked for the same thing
at once; it is cancelled only when none of them wants it any more.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from sdxl_split.encoder_service.dispatcher import Dispatcher, JobWatcher
from sdxl_split.encoder_service.model_thread import (
    EncodeRequest,
    EncoderModelThread,
    JobReady,
    ModelThreadFailed,
    RequestFailed,
)
from sdxl_split.shared import protocol as p
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.image_settings import JobOptions
from sdxl_split.shared.jobs import job_id_for
from sdxl_split.shared.prompts import PromptEntry


@dataclass(frozen=True)
class Generation:
    """One request's work: its jobs (an entry each, with its seed and image count), what they ask of the
    denoisers, and its own clip skip. Entry i's `line` is i + 1, which names the job to the listener."""

    request_id: str
    entries: tuple[PromptEntry, ...]
    options: JobOptions = JobOptions()
    clip_skip: int | None = None


class GenerationListener(Protocol):
    """Hears what becomes of a Generation's jobs, on the serve loop's thread (hand it over to your own)."""

    def job_progress(self, index: int, progress: p.Progress) -> None: ...

    def job_done(self, index: int, done: p.Done) -> None: ...

    def job_failed(self, index: int, reason: str) -> None: ...

    def failed(self, reason: str, internal: bool = False) -> None:
        """Nothing of it can be rendered: a LoRA its prompt names does not exist, say, or (`internal`) a fault of
        the server's own."""


@dataclass
class _Request:
    generation: Generation
    listener: GenerationListener
    jobs: set[str]
    # Jobs not yet done or failed; the request is forgotten when none is left.
    unfinished: int = 0


class ServeLoop(JobWatcher):
    def __init__(self, dispatcher: Dispatcher, model: EncoderModelThread, settings: EncodingSettings) -> None:
        self.dispatcher = dispatcher
        self.model = model
        self.settings = settings
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}
        # job id -> the (request, job index) pairs waiting for it
        self._waiters: dict[str, list[tuple[str, int]]] = {}
        # Set once the loop cannot go on; under the lock, so no request is queued after fail_all has looked.
        self._failure: str | None = None
        self._failure_lock = threading.Lock()
        dispatcher.watcher = self

    # ---- from any thread ----
    def submit(self, generation: Generation, listener: GenerationListener) -> None:
        with self._failure_lock:
            if self._failure is None:
                self._command(lambda: self._submit(generation, listener))
                return
        listener.failed(self._failure, internal=True)

    def cancel(self, request_id: str, reason: str, indexes: tuple[int, ...] | None = None) -> None:
        """Drop a request (or only the jobs at `indexes`, A1111's skip); its listener hears nothing more of them."""
        self._command(lambda: self._cancel(request_id, reason, indexes))

    def _command(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self.dispatcher.wakeup.set()

    # ---- on the loop's thread ----
    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; what is still running then is left to the denoisers' BYE."""
        heartbeat = self.dispatcher.config.heartbeat_s
        while not stop.is_set():
            self._handle_commands()
            self._handle(self.model.take())
            # A job every attached denoiser refused (a LoRA none of them has) fails now, saying why.
            self.dispatcher.table.give_up_stranded()
            self.dispatcher.pump(heartbeat)

    def fail_all(self, reason: str) -> None:
        """The loop cannot go on: every request it holds, or was handed and has not read yet, hears so rather than
        waiting for ever; any submitted later hears it at once. On the loop's thread, after run() raised."""
        with self._failure_lock:
            self._failure = reason
        self._handle_commands()  # the submits queued before: they join the requests answered below
        requests, self._requests = list(self._requests.values()), {}
        for request in requests:
            request.listener.failed(reason, internal=True)

    def _handle_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _submit(self, generation: Generation, listener: GenerationListener) -> None:
        self._requests[generation.request_id] = _Request(generation, listener, set(), len(generation.entries))
        settings = replace(self.settings, clip_skip=generation.clip_skip) if generation.clip_skip else None
        self.model.submit(EncodeRequest(generation.entries, tag=generation.request_id, settings=settings))

    def _handle(self, items: list) -> None:
        for item in items:
            if isinstance(item, ModelThreadFailed):
                raise item.error
            request = self._requests.get(item.tag)
            if request is None:
                continue
            if isinstance(item, JobReady):
                self._queue(request, item)
            elif isinstance(item, RequestFailed):
                # Jobs it already queued (prompts found in the cache before the one that failed) stop too.
                self._cancel(item.tag, item.reason, None)
                request.listener.failed(item.reason, internal=item.error is not None)
                if item.error is not None:
                    self.dispatcher.report(f"error: request {item.tag}: {item.reason}; the server goes on")
        if any(isinstance(item, JobReady) for item in items):
            self.dispatcher.pump(0)  # hand the new jobs out now

    def _queue(self, request: _Request, ready: JobReady) -> None:
        options = request.generation.options
        job_id = job_id_for(ready.embedding_key, ready.entry.seed, ready.entry.count, ready.loras,
                            options.settings.as_dict())
        table = self.dispatcher.table
        if job_id not in self._waiters:
            # Asked for again after it ended (its denoiser then finds its images in --out): every end forgets a job,
            # and one left over would read as a duplicate to add() and leave this request waiting.
            table.forget(job_id)
            self.dispatcher.add(job_id, ready.entry, ready.embedding_key, ready.loras, options)
        self._waiters.setdefault(job_id, []).append((request.generation.request_id, ready.entry.line - 1))
        request.jobs.add(job_id)

    def _cancel(self, request_id: str, reason: str, indexes: tuple[int, ...] | None) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        if indexes is None:
            self._requests.pop(request_id)
        for job_id in list(request.jobs):
            mine = [waiter for waiter in self._waiters.get(job_id, [])
                    if waiter[0] == request_id and (indexes is None or waiter[1] in indexes)]
            if not mine:
                continue
            request.jobs.discard(job_id)
            request.unfinished -= len(mine)
            waiters = [w for w in self._waiters.get(job_id, []) if w not in mine]
            if waiters:
                self._waiters[job_id] = waiters
            else:
                self._waiters.pop(job_id, None)
                self.dispatcher.cancel(job_id, reason)
                self.dispatcher.table.forget(job_id)
        if request.unfinished <= 0:
            self._requests.pop(request_id, None)

    def _each_waiter(self, job_id: str, ended: bool) -> list[tuple[_Request, int]]:
        waiters = self._waiters.pop(job_id, []) if ended else self._waiters.get(job_id, [])
        if ended:
            self.dispatcher.table.forget(job_id)
        found = [(self._requests[request_id], index) for request_id, index in waiters
                 if request_id in self._requests]
        if ended:
            for request, _ in found:
                request.unfinished -= 1
                if request.unfinished <= 0:
                    self._requests.pop(request.generation.request_id, None)
        return found

    # ---- JobWatcher: what the dispatcher hears from denoisers ----
    def finished(self, done: p.Done) -> None:
        for request, index in self._each_waiter(done.job_id, ended=True):
            request.listener.job_done(index, done)

    def progressed(self, progress: p.Progress) -> None:
        for request, index in self._each_waiter(progress.job_id, ended=False):
            request.listener.job_progress(index, progress)

    def event(self, name: str, job_id: str, fields: dict) -> None:
        """The job table's journal events: a dead-lettered job fails its requests with its reason."""
        if name == "dead_letter":
            for request, index in self._each_waiter(job_id, ended=True):
                request.listener.job_failed(index, str(fields.get("reason", "it could not be rendered")))
