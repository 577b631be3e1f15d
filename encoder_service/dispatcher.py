"""The encoder's ROUTER: queues jobs, sends them against credit, tracks liveness, re-queues and dead-letters."""

from __future__ import annotations

import logging
import time
from collections import deque
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


@dataclass(frozen=True)
class LinkConfig:
    endpoint: str
    # Encoder key folder from `sdxl-split keys init` (server.key_secret + allowed_clients/); None = no CURVE.
    curve_dir: Path | None = None
    max_attempts: int = 3
    heartbeat_s: float = p.HEARTBEAT_INTERVAL_S
    liveness: int = p.HEARTBEAT_LIVENESS


@dataclass
class _Job:
    work_id: str
    entry: PromptEntry
    record: Embeddings
    payload: bytes
    attempt: int = 0
    worker: bytes | None = None
    state: str = "queued"  # queued | dispatched | done | dead


@dataclass
class _Worker:
    identity: bytes
    name: str
    credits: int
    last_seen: float
    inflight: set[str] = field(default_factory=set)
    done: int = 0


class Dispatcher:
    def __init__(self, config: LinkConfig, journal: Journal, report: Callable[[str], None] = log.warning) -> None:
        self.config = config
        self.journal = journal
        # Images a previous run of this journal finished, by (job, output folder): not sent again.
        self.finished = journal.finished()
        self.already_done = 0
        self.report = report
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        p.configure_router(self.socket)
        self._auth = None
        if config.curve_dir is not None:
            self._auth = start_authenticator(self.context, config.curve_dir / "allowed_clients")
            make_curve_server(self.socket, config.curve_dir / "server.key_secret")
        self.socket.bind(config.endpoint)
        self.jobs: dict[str, _Job] = {}
        self.queue: deque[str] = deque()
        self.workers: dict[bytes, _Worker] = {}
        self.ever_attached = False
        self.last_live = time.monotonic()
        self._next_beat = 0.0
        self.dropped_messages = 0
        self.last_peer_seen = 0.0
        self.out_dirs: dict[bytes, str] = {}

    # ---- jobs ----
    def add(self, work_id: str, entry: PromptEntry, record: Embeddings, payload: bytes) -> None:
        if work_id in self.jobs:
            return
        self.jobs[work_id] = _Job(work_id, entry, record, payload)
        self.queue.append(work_id)
        self.journal.log("queued", work_id, line=entry.line, prompt=entry.prompt[:200])

    @property
    def outstanding(self) -> int:
        return sum(job.state in ("queued", "dispatched") for job in self.jobs.values())

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
            if not self.socket.poll(int(min(remaining, self.config.heartbeat_s) * 1000), zmq.POLLIN):
                self._housekeeping()
                if time.monotonic() >= deadline:
                    return
                continue
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
        if self.workers:
            self.last_live = now
        if now >= self._next_beat:
            for worker in list(self.workers.values()):
                self._send(worker, p.Heartbeat())
            self._next_beat = now + self.config.heartbeat_s
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            ready = [w for w in self.workers.values() if w.credits > 0]
            if not ready:
                return
            worker = max(ready, key=lambda w: (w.credits, -len(w.inflight)))
            job = self.jobs[self.queue.popleft()]
            if job.state != "queued":
                continue
            images = self.finished.get((job.work_id, self.out_dirs.get(worker.identity, "")))
            if images is not None:
                job.state = "done"
                self.already_done += 1
                self.journal.log("done", job.work_id, out_dir=self.out_dirs[worker.identity], images=images,
                                 reused=True)
                continue
            job.attempt += 1
            message = p.Job.build(job.work_id, job.attempt, job.entry, job.record, job.payload)
            if not self._send(worker, message):
                job.attempt -= 1
                self.queue.appendleft(job.work_id)
                continue
            job.state, job.worker = "dispatched", worker.identity
            worker.credits -= 1
            worker.inflight.add(job.work_id)
            self.journal.log("dispatched", job.work_id, attempt=job.attempt, worker=worker.name)

    def _send(self, worker: _Worker, message: p.Message) -> bool:
        try:
            self.socket.send_multipart([worker.identity, *p.encode(message)], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False  # its queue is full (HWM); try later
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
            self.dropped_messages += 1
            self.report(f"dropped a bad message from a peer: {err}")
            return
        self.last_peer_seen = time.monotonic()
        worker = self.workers.get(identity)
        if isinstance(message, p.Ready):
            self.out_dirs[identity] = message.out_dir
            if worker is not None:
                self._lose(worker, f"denoiser {worker.name} restarted", quiet=True)
            self.workers[identity] = _Worker(identity, f"{message.worker}[{message.pid}]@{message.device}",
                                             message.credits, time.monotonic())
            self.ever_attached = True
            self.report(f"denoiser {message.worker} (pid {message.pid}, {message.device}) attached with "
                        f"{message.credits} credits")
            return
        if worker is None:
            # Purged as dead, or never said READY: it will reconnect and READY again when heartbeats stop.
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
            self.dropped_messages += 1
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
        worker.done += 1
        self.journal.log("done", job.work_id, attempt=done.attempt, worker=worker.name, seconds=done.seconds,
                         out_dir=self.out_dirs.get(worker.identity),
                         images=[{"file": i.file, "sha256": i.sha256} for i in done.images])

    def _fail(self, worker: _Worker, work_id: str, attempt: int, reason: str) -> None:
        job = self._owned(worker, work_id, attempt)
        if job is None:
            return
        self.journal.log("failed", job.work_id, attempt=attempt, worker=worker.name, reason=reason)
        self._retry_or_bury(job, reason)

    def _retry_or_bury(self, job: _Job, reason: str) -> None:
        job.worker = None
        if job.attempt >= self.config.max_attempts:
            job.state = "dead"
            self.journal.log("dead_letter", job.work_id, attempts=job.attempt, reason=reason)
            self.report(f"gave up on line {job.entry.line} ({job.entry.prompt[:50]!r}) after {job.attempt} "
                        f"attempts: {reason}")
        else:
            job.state = "queued"
            self.queue.appendleft(job.work_id)
            self.journal.log("requeued", job.work_id, attempt=job.attempt, reason=reason)

    def _lose(self, worker: _Worker, why: str, quiet: bool = False) -> None:
        self.workers.pop(worker.identity, None)
        if not quiet or worker.inflight:
            self.report(why + (f"; re-queueing {len(worker.inflight)} job(s)" if worker.inflight else ""))
        for work_id in sorted(worker.inflight):
            job = self.jobs[work_id]
            if job.state == "dispatched" and job.worker == worker.identity:
                self._retry_or_bury(job, why)

    # ---- shutdown ----
    def close(self, reason: str = "encoder finished", ack_timeout_s: float = 3.0) -> None:
        """Say BYE and wait for each denoiser's BYE back. A DEALER with IMMEDIATE drops unread messages
        when its peer disconnects, so closing straight after sending could lose the BYE itself."""
        waiting = {identity: worker.name for identity, worker in self.workers.items()}
        deadline = time.monotonic() + ack_timeout_s
        next_send = 0.0
        while waiting and time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                for identity in list(waiting):
                    try:
                        self.socket.send_multipart([identity, *p.encode(p.Bye(reason))], flags=zmq.NOBLOCK)
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
