"""Between the HTTP handlers (asyncio) and the engine (its serve loop's thread): each request's jobs tracked as they
progress, finish or fail, a bounded queue of requests, first come first served, and what /progress reports.

The engine's listener calls arrive on the serve loop's thread; each is handed to the event loop with
call_soon_threadsafe, so the trackers are only ever touched on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sdxl_split.encoder_service.serve_loop import Generation
from sdxl_split.shared import protocol as p


class QueueFull(Exception):
    """More requests than --max-queue are waiting or running; `retry_after_s` is when one may have finished."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server has {retry_after_s} s of work queued")
        self.retry_after_s = retry_after_s


class Stopping(Exception):
    """The server is shutting down: a request that arrives now is refused (503), not left to hold the stop."""


class GenerationFailed(Exception):
    """Nothing of the request could be rendered; the message says why. `internal`: the server's fault (500), not
    the request's (422)."""

    def __init__(self, reason: str, internal: bool = False) -> None:
        super().__init__(reason)
        self.internal = internal


@dataclass
class JobView:
    """One job of a request, as far as it has come."""

    images: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, PNG bytes), in order
    step: int = 0
    steps: int = 0
    failed: str | None = None
    skipped: bool = False
    finished: bool = False
    seconds: float = 0.0  # the denoiser's time on it, from its DONE


@dataclass
class Tracker:
    """One request, on the event loop's thread."""

    request_id: str
    jobs: list[JobView]
    started: float = field(default_factory=time.monotonic)
    running_since: float | None = None
    interrupted: bool = False
    preview: bytes = b""
    previews: asyncio.Queue = field(default_factory=asyncio.Queue)  # preview PNGs, for a streaming client
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    internal: bool = False  # the error is the server's fault, not the request's

    @property
    def fraction(self) -> float:
        """How far it has come, 0 to 1, counting steps within the jobs."""
        total = 0.0
        for job in self.jobs:
            total += 1.0 if job.finished else (job.step / job.steps if job.steps else 0.0)
        return total / len(self.jobs)

    def images(self) -> list[tuple[str, bytes]]:
        return [image for job in self.jobs for image in job.images]

    def finish_if_complete(self) -> None:
        if all(job.finished for job in self.jobs):
            self.done.set()


class _Listener:
    """The engine's GenerationListener for one request: hands every call over to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tracker: Tracker) -> None:
        self._loop = loop
        self._tracker = tracker

    def _later(self, call: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(call)

    def job_progress(self, index: int, progress: p.Progress) -> None:
        self._later(lambda: _progressed(self._tracker, index, progress))

    def job_done(self, index: int, done: p.Done) -> None:
        images = list(zip((image.file for image in done.images), done.image_bytes))
        self._later(lambda: _finished(self._tracker, index, images=images, seconds=done.seconds))

    def job_failed(self, index: int, reason: str) -> None:
        self._later(lambda: _finished(self._tracker, index, failed=reason))

    def failed(self, reason: str, internal: bool = False) -> None:
        def fail() -> None:
            self._tracker.error, self._tracker.internal = reason, internal
            self._tracker.done.set()

        self._later(fail)


def _progressed(tracker: Tracker, index: int, progress: p.Progress) -> None:
    job = tracker.jobs[index]
    job.step, job.steps = progress.step, progress.steps
    tracker.running_since = tracker.running_since or time.monotonic()
    if progress.preview:
        tracker.preview = progress.preview
        tracker.previews.put_nowait(progress.preview)


def _finished(tracker: Tracker, index: int, images: list | None = None, failed: str | None = None,
              seconds: float = 0.0) -> None:
    job = tracker.jobs[index]
    if job.finished:
        return
    job.images, job.failed, job.finished, job.seconds = images or [], failed, True, seconds
    tracker.finish_if_complete()


class Broker:
    """The requests the server holds, oldest first; at most `max_queue` at once."""

    def __init__(self, engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.active: dict[str, Tracker] = {}
        self.stopping = False
        self._numbers = itertools.count(1)
        # Seconds a request took lately: what a client told to come back later is told to wait.
        self._recent_s: list[float] = []

    def retry_after_s(self) -> int:
        typical = sorted(self._recent_s)[len(self._recent_s) // 2] if self._recent_s else 5.0
        return max(1, min(120, round(typical * len(self.active) / max(1, self.engine.denoisers()))))

    def start(self, entries_for: Callable[[str], Generation]) -> Tracker:
        """Accept a request (or raise QueueFull) and hand it to the engine; `entries_for(request_id)` makes it."""
        if self.stopping:
            raise Stopping("the server is stopping")
        if len(self.active) >= self.max_queue:
            raise QueueFull(self.retry_after_s())
        request_id = f"r{next(self._numbers)}-{secrets.token_hex(4)}"
        generation = entries_for(request_id)
        tracker = Tracker(request_id, [JobView() for _ in generation.entries])
        self.active[request_id] = tracker
        try:
            self.engine.submit(generation, _Listener(asyncio.get_running_loop(), tracker))
        except Exception:
            del self.active[request_id]  # refused (the engine is down): it holds no place in the queue
            raise
        return tracker

    def end(self, tracker: Tracker) -> None:
        if self.active.pop(tracker.request_id, None) is not None and tracker.done.is_set() and not tracker.interrupted:
            self._recent_s = [*self._recent_s[-19:], time.monotonic() - tracker.started]

    def cancel(self, tracker: Tracker, reason: str) -> None:
        """The client left or interrupted it: its jobs stop, and what finished is what it gets."""
        if tracker.done.is_set():
            return
        tracker.interrupted = True
        self.engine.cancel(tracker.request_id, reason)
        for job in tracker.jobs:
            job.finished = True
        tracker.done.set()

    def cancel_all(self, reason: str) -> None:
        """The server is stopping: every request it holds ends now, with what finished, and none is taken after
        (a keep-alive client's next request would otherwise hold the shutdown for its whole length)."""
        self.stopping = True
        for tracker in list(self.active.values()):
            self.cancel(tracker, reason)

    def skip(self, tracker: Tracker) -> None:
        """A1111's skip: the jobs now rendering stop, the request goes on with the rest."""
        running = [index for index, job in enumerate(tracker.jobs) if job.step and not job.finished]
        if running:
            self.engine.cancel(tracker.request_id, "skipped", indexes=tuple(running))
            for index in running:
                tracker.jobs[index].skipped = tracker.jobs[index].finished = True
            tracker.finish_if_complete()

    def current(self) -> Tracker | None:
        """What /progress reports on, and /interrupt stops: the oldest request."""
        return next(iter(self.active.values()), None)

    async def wait(self, tracker: Tracker, disconnected: asyncio.Future) -> None:
        """Until the request is done, or its client disconnects (then it is cancelled)."""
        done = asyncio.ensure_future(tracker.done.wait())
        try:
            await asyncio.wait({done, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
        if not tracker.done.is_set():
            self.cancel(tracker, "the HTTP client disconnected")
        if tracker.error is not None and not tracker.interrupted:
            raise GenerationFailed(tracker.error, tracker.internal)
