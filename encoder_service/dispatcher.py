"""The encoder's ROUTER: queues jobs, sends them against credit, tracks liveness, re-queues and dead-letters."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from sdxl_split.encoder_service.journal import Journal
from sdxl_split.shared import protocol as p
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.security import make_curve_server, start_authenticator

log = logging.getLogger("sdxl_split.encoder")

# Returns a job's embedding record and its bytes (from the cache), or raises LookupError.
Fetch = Callable[[str], tuple[Embeddings, bytes]]


@dataclass(frozen=True)
class LinkConfig:
    endpoint: str
    # Encoder key folder from `sdxl-split keys init` (server.key_secret + allowed_clients/); None = no CURVE.
    curve_dir: Path | None = None
    # ERRORs a job may get before it is dead-lettered.
    max_attempts: int = 3
    heartbeat_s: float = p.HEARTBEAT_INTERVAL_S
    liveness: int = p.HEARTBEAT_LIVENESS


@dataclass
class _Job:
    """Only the key is held: the record and its bytes are read from the cache when sent, so the encoder's
    memory stays flat however many prompts are queued."""

    work_id: str
    entry: PromptEntry
    embedding_key: str
    attempt: int = 0  # sends so far; a DONE/ERROR must name the current one
    failures: int = 0  # ERRORs
    losses: int = 0  # times its denoiser died or left holding it
    worker: bytes | None = None
    failed_on: set[bytes] = field(default_factory=set)
    state: str = "queued"  # queued | dispatched | done | dead


@dataclass
class _Worker:
    identity: bytes
    name: str
    credits: int
    last_seen: float
    out_dir: str
    settings_id: str
    inflight: set[str] = field(default_factory=set)


class Dispatcher:
    def __init__(self, config: LinkConfig, journal: Journal, fetch: Fetch,
                 report: Callable[[str], None] = log.warning) -> None:
        self.config = config
        self.journal = journal
        self.fetch = fetch
        self.report = report
        # Images a previous run finished, by (job, output folder, render settings): not rendered again.
        self.finished = journal.finished()
        self.already_done = 0
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        p.configure_router(self.socket)
        self._auth = None
        if config.curve_dir is not None:
            self._auth = start_authenticator(self.context, config.curve_dir / "allowed_clients")
            make_curve_server(self.socket, config.curve_dir / "server.key_secret")
        self.socket.bind(config.endpoint)
        self.jobs: dict[str, _Job] = {}
        self.queue: list[str] = []
        self.workers: dict[bytes, _Worker] = {}
        self.ever_attached = False
        self.draining = False  # stopping: hand out nothing new, wait for what is out
        self._next_beat = 0.0
        self.last_peer_seen = 0.0

    # ---- jobs ----
    def add(self, work_id: str, entry: PromptEntry, embedding_key: str) -> None:
        if work_id in self.jobs:
            return
        self.jobs[work_id] = _Job(work_id, entry, embedding_key)
        self.queue.append(work_id)
        self.journal.log("queued", work_id, line=entry.line, prompt=entry.prompt[:200])

    @property
    def outstanding(self) -> int:
        return sum(job.state in ("queued", "dispatched") for job in self.jobs.values())

    @property
    def in_flight(self) -> int:
        return sum(job.state == "dispatched" for job in self.jobs.values())

    def counts(self) -> dict[str, int]:
        out = {"queued": 0, "dispatched": 0, "done": 0, "dead": 0}
        for job in self.jobs.values():
            out[job.state] += 1
        out["done"] -= self.already_done
        return out

    # ---- the loop body ----
    def pump(self, timeout_s: float = 0.0) -> None:
        """Handle what arrived within timeout_s, then dispatch, heartbeat and purge."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            if self.socket.poll(int(min(remaining, self.config.heartbeat_s) * 1000), zmq.POLLIN):
                while self.socket.poll(0, zmq.POLLIN):
                    self._receive()
            self._housekeeping()
            if time.monotonic() >= deadline:
                return

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if now - worker.last_seen > self.config.heartbeat_s * self.config.liveness:
                self._lose(worker, f"denoiser {worker.name} missed {self.config.liveness} heartbeats")
        if now >= self._next_beat:
            for worker in list(self.workers.values()):
                self._send(worker, p.Heartbeat())
            self._next_beat = now + self.config.heartbeat_s
        if not self.draining:
            self._dispatch()

    def _pick(self, job: _Job, ready: list[_Worker]) -> _Worker | None:
        """The freest worker that has not failed this job; one that has, only if no other is alive."""
        fresh = [w for w in ready if w.identity not in job.failed_on]
        if not fresh and any(w.identity not in job.failed_on for w in self.workers.values()):
            return None  # wait for a denoiser that has not failed it yet
        pool = fresh or ready
        return max(pool, key=lambda w: (w.credits, -len(w.inflight))) if pool else None

    def _dispatch(self) -> None:
        blocked: set[bytes] = set()  # full send queues this round: skip them, never spin
        for work_id in list(self.queue):
            ready = [w for w in self.workers.values() if w.credits > 0 and w.identity not in blocked]
            if not ready:
                return
            job = self.jobs[work_id]
            worker = self._pick(job, ready)
            if worker is None:
                continue
            images = self.finished.get((job.work_id, worker.out_dir, worker.settings_id))
            if images is not None:
                self.queue.remove(work_id)
                job.state = "done"
                self.already_done += 1
                self.journal.log("done", job.work_id, out_dir=worker.out_dir, settings=worker.settings_id,
                                 images=images, reused=True)
                continue
            try:
                record, payload = self.fetch(job.embedding_key)
            except LookupError as err:
                self.queue.remove(work_id)
                self._bury(job, f"embeddings unavailable: {err}")
                continue
            message = p.Job.build(job.work_id, job.attempt + 1, job.entry, record, payload)
            sent = self._send(worker, message)
            if sent is None:
                blocked.add(worker.identity)
                continue
            if not sent:
                continue
            self.queue.remove(work_id)
            job.attempt += 1
            job.state, job.worker = "dispatched", worker.identity
            worker.credits -= 1
            worker.inflight.add(job.work_id)
            self.journal.log("dispatched", job.work_id, attempt=job.attempt, worker=worker.name)

    def _send(self, worker: _Worker, message: p.Message) -> bool | None:
        """True if sent; None if its queue is full (try later); False if the peer is gone (it was lost)."""
        try:
            self.socket.send_multipart([worker.identity, *p.encode(message)], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return None
        except zmq.ZMQError as err:
            if err.errno == zmq.EHOSTUNREACH:  # ROUTER_MANDATORY: the peer is gone
                self._lose(worker, f"denoiser {worker.name} disconnected")
                return False
            raise

    def _receive(self) -> None:
        frames = self.socket.recv_multipart()
        identity, body = frames[0], frames[1:]
        try:
            message = p.decode(body)
        except p.ProtocolError as err:
            self.report(f"dropped a bad message from a peer: {err}")
            return
        self.last_peer_seen = time.monotonic()
        worker = self.workers.get(identity)
        if isinstance(message, p.Ready):
            if worker is not None:
                self._lose(worker, f"denoiser {worker.name} restarted", quiet=True)
            self.workers[identity] = _Worker(identity, f"{message.worker}[{message.pid}]@{message.device}",
                                             message.credits, time.monotonic(), message.out_dir,
                                             message.settings_id)
            self.ever_attached = True
            self.report(f"denoiser {message.worker} (pid {message.pid}, {message.device}) attached with "
                        f"{message.credits} credits")
            return
        if worker is None:
            if isinstance(message, p.Dead):
                self.report(f"a denoiser died before it was ready: {message.reason}")
            # Otherwise: purged as dead, or not READY yet; it will READY (again) when heartbeats stop.
            return
        worker.last_seen = time.monotonic()
        if isinstance(message, p.Done):
            self._finish(worker, message)
        elif isinstance(message, p.Error):
            self._fail(worker, message.job_id, message.attempt, message.reason)
        elif isinstance(message, p.Dead):
            self._lose(worker, f"denoiser {worker.name} died: {message.reason}")
        elif isinstance(message, p.Bye):
            self._lose(worker, f"denoiser {worker.name} left", quiet=True)
        elif isinstance(message, p.Job):
            self.report(f"dropped a JOB sent by denoiser {worker.name}; only the encoder sends jobs")

    def _owned(self, worker: _Worker, work_id: str, attempt: int) -> _Job | None:
        """The job if this report is about its current attempt; a late report about an attempt that
        was re-queued elsewhere only returns the credit."""
        if work_id in worker.inflight:
            worker.inflight.discard(work_id)
            worker.credits += 1
        job = self.jobs.get(work_id)
        if job is None or job.state != "dispatched" or job.attempt != attempt or job.worker != worker.identity:
            return None
        return job

    def _finish(self, worker: _Worker, done: p.Done) -> None:
        job = self._owned(worker, done.job_id, done.attempt)
        if job is None:
            return
        job.state = "done"
        self.journal.log("done", job.work_id, attempt=done.attempt, worker=worker.name, seconds=done.seconds,
                         out_dir=worker.out_dir, settings=worker.settings_id,
                         images=[{"file": i.file, "sha256": i.sha256} for i in done.images])

    def _fail(self, worker: _Worker, work_id: str, attempt: int, reason: str) -> None:
        job = self._owned(worker, work_id, attempt)
        if job is None:
            return
        job.failures += 1
        job.failed_on.add(worker.identity)
        self.journal.log("failed", job.work_id, attempt=attempt, worker=worker.name, reason=reason)
        self._retry_or_bury(job, reason)

    def _retry_or_bury(self, job: _Job, reason: str) -> None:
        job.worker = None
        # A job that keeps killing its denoisers (say, OOM) is given up too, with more leeway, since a
        # denoiser can also die or leave for reasons of its own.
        if job.failures >= self.config.max_attempts or job.losses >= 2 * self.config.max_attempts:
            self._bury(job, reason)
        else:
            job.state = "queued"
            self.queue.insert(0, job.work_id)
            self.journal.log("requeued", job.work_id, attempt=job.attempt, reason=reason)

    def _bury(self, job: _Job, reason: str) -> None:
        job.state = "dead"
        self.journal.log("dead_letter", job.work_id, attempts=job.attempt, reason=reason)
        self.report(f"gave up on line {job.entry.line} ({job.entry.prompt[:50]!r}) after {job.attempt} "
                    f"attempt(s): {reason}")

    def _lose(self, worker: _Worker, why: str, quiet: bool = False) -> None:
        self.workers.pop(worker.identity, None)
        if not quiet or worker.inflight:
            self.report(why + (f"; re-queueing {len(worker.inflight)} job(s)" if worker.inflight else ""))
        for work_id in sorted(worker.inflight):
            job = self.jobs[work_id]
            if job.state == "dispatched" and job.worker == worker.identity:
                job.losses += 1
                self._retry_or_bury(job, why)

    # ---- shutdown ----
    def close(self, reason: str = "encoder finished", dead: bool = False, ack_timeout_s: float = 3.0) -> None:
        """Say BYE (or DEAD) and wait for each denoiser's BYE back. A DEALER with IMMEDIATE drops unread
        messages when its peer disconnects, so closing straight after sending could lose the BYE itself."""
        farewell: p.Message = p.Dead(reason) if dead else p.Bye(reason)
        waiting = {identity: worker.name for identity, worker in self.workers.items()}
        deadline = time.monotonic() + ack_timeout_s
        next_send = 0.0
        while waiting and time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                for identity in list(waiting):
                    try:
                        self.socket.send_multipart([identity, *p.encode(farewell)], flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        waiting.pop(identity)  # gone already, or its queue is full: nothing to wait for
                next_send = time.monotonic() + 0.5
            if self.socket.poll(100, zmq.POLLIN):
                identity, *body = self.socket.recv_multipart()
                try:
                    if isinstance(p.decode(body), p.Bye):
                        waiting.pop(identity, None)
                except p.ProtocolError:
                    pass
        self.socket.close(linger=500)
        if self._auth is not None:
            self._auth.stop()
        self.context.term()
