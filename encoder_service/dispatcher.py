"""The encoder's ROUTER socket loop: heartbeats, liveness, and carrying messages to and from the job table."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from sdxl_split.encoder_service.config import LinkConfig
from sdxl_split.encoder_service.job_records import DenoiserRecord
from sdxl_split.encoder_service.job_table import JobTable
from sdxl_split.encoder_service.journal import Journal
from sdxl_split.shared import protocol as p
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.handshakes import HandshakeMonitor, encoder_side
from sdxl_split.shared.image_settings import JobOptions
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.security import make_curve_server, start_authenticator
from sdxl_split.shared.text import plural
from sdxl_split.shared.wakeup import Wakeup

log = logging.getLogger("sdxl_split.encoder")

# Returns a job's embedding record and its bytes (from the cache), or raises LookupError.
Fetch = Callable[[str], tuple[Embeddings, bytes]]


class JobWatcher:
    """Who wants to hear how jobs go, beyond the journal: the HTTP server, whose clients wait for them. Called on
    the dispatcher's thread; the default hears nothing."""

    def finished(self, done: p.Done) -> None:
        """A job's DONE, its PNGs in it when the job asked for them."""

    def progressed(self, progress: p.Progress) -> None:
        """A step of a job, with a preview at some steps."""

    def event(self, name: str, job_id: str, fields: dict) -> None:
        """An event of the job table, as the journal records it (a dead-lettered job, say)."""


class Dispatcher:
    """The ROUTER socket loop: what peers send goes into the job table, what the table picks goes out."""

    def __init__(self, config: LinkConfig, journal: Journal, fetch: Fetch,
                 report: Callable[[str], None] = log.warning,
                 on_event: Callable[[str, str, dict], None] = lambda name, job_id, fields: None) -> None:
        self.config = config
        self.journal = journal
        self.fetch = fetch
        self.report = report
        # What the serve loop hears of its jobs; it sets itself here (a prompt file's loop needs none).
        self.watcher = JobWatcher()

        def record(event: str, job_id: str, **fields) -> None:
            journal.log(event, job_id, **fields)
            on_event(event, job_id, fields)
            self.watcher.event(event, job_id, fields)

        self.table = JobTable(config.max_attempts, log=record, report=report, finished=journal.finished(),
                              job_timeout_s=config.job_timeout_s,
                              tell=lambda identity, why: self._send_to(identity, p.Bye(p.reason_text(why))))
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        p.configure_router(self.socket)
        self._auth = None
        if config.curve_dir is not None:
            self._auth = start_authenticator(self.context, config.curve_dir / "allowed_clients")
            make_curve_server(self.socket, config.curve_dir / "server.key_secret")
        self.socket.bind(config.endpoint)
        # Set by other threads (a finished encode) and by a stop request, to end a poll at once.
        self.wakeup = Wakeup()
        # ZeroMQ drops a peer that breaks the protocol or sends a frame over MAXMSGSIZE without a word to us:
        # its monitor is the only witness. It also says why a handshake failed (CURVE keys that do not match).
        self.monitor = HandshakeMonitor(self.socket, lambda event, value: encoder_side(event, value, config.curve_dir),
                                        report)
        self._byes = 0  # BYEs whose disconnects are expected
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self.wakeup, zmq.POLLIN)
        self._poller.register(self.monitor.socket, zmq.POLLIN)
        self._next_beat = 0.0
        self.last_peer_seen = 0.0

    def add(self, job_id: str, entry: PromptEntry, embedding_key: str, loras: tuple = (),
            options: JobOptions = JobOptions()) -> bool:
        return self.table.add(job_id, entry, embedding_key, loras, options)

    def cancel(self, job_id: str, reason: str) -> None:
        """Drop a job nobody wants; the denoiser rendering it stops at its next step."""
        holder = self.table.cancel(job_id)
        if holder is not None:
            identity, attempt = holder
            self._send_to(identity, p.Cancel(job_id=job_id, attempt=attempt, reason=p.reason_text(reason)))

    # ---- the loop body ----
    def pump(self, timeout_s: float = 0.0) -> None:
        """Wait up to timeout_s (never past the next heartbeat) for a message or a wake-up, handle what arrived,
        then dispatch, heartbeat and purge. Returns as soon as anything happened: callers loop."""
        wait_s = min(timeout_s, max(0.0, self._next_beat - time.monotonic()))
        events = dict(self._poller.poll(wait_s * 1000))
        # pyzmq reports a plain fd by its number, not the object: clear unconditionally (a non-blocking read).
        self.wakeup.clear()
        if self.socket in events:
            while self.socket.poll(0, zmq.POLLIN):
                self._receive()
        if self.monitor.socket in events:
            self._disconnects()
        self._housekeeping()

    def _disconnects(self) -> None:
        for event in self.monitor.events():
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            if self._byes:
                self._byes -= 1  # a denoiser that said BYE, leaving
                continue
            self.report(f"a peer's connection (fd {event['value']}) closed without a BYE: it crashed, or ZeroMQ "
                        f"dropped it for a frame over {p.DEFAULT_MAX_PAYLOAD // 2**20} MiB or a broken handshake; "
                        "any jobs it held are re-queued once its heartbeats stop")

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for denoiser in self.table.silent(now, self.config.heartbeat_s * self.config.liveness):
            self.table.lose(denoiser.identity, f"denoiser {denoiser.name} missed {self.config.liveness} heartbeats")
        for denoiser, limit in self.table.overdue(now):
            # Heartbeats come from its main loop, so a render thread stuck in a CUDA call or a deadlock looks
            # alive: only a deadline catches it. It is dropped, and told why.
            why = (f"denoiser {denoiser.name} made no progress on its {plural(len(denoiser.inflight), 'job')} for "
                   f"{limit:.0f} s (--job-timeout); "
                   "disconnecting it")
            self.table.lose(denoiser.identity, why)
            self._send_to(denoiser.identity, p.Bye(why))
        if now >= self._next_beat:
            for denoiser in list(self.table.denoisers.values()):
                self._send(denoiser, p.Heartbeat())
            self._next_beat = now + self.config.heartbeat_s
        self._dispatch()

    def _dispatch(self) -> None:
        blocked: set[bytes] = set()  # full send queues this round: skip them, never spin
        while (pick := self.table.pick(blocked)) is not None:
            job, denoiser = pick
            try:
                record, payload = self.fetch(job.embedding_key)
            except LookupError as err:
                self.table.unsendable(job, str(err))
                continue
            sent = self._send(denoiser, p.Job.build(job.job_id, job.attempt + 1, job.entry, record, payload,
                                                  job.loras, job.options))
            if sent is None:
                blocked.add(denoiser.identity)
            elif sent:
                self.table.sent(job, denoiser, time.monotonic())

    def _send_to(self, identity: bytes, message: p.Message) -> None:
        """Best effort, to a peer that is not (or no longer) in the table."""
        try:
            self.socket.send_multipart([identity, *p.encode(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _send(self, denoiser: DenoiserRecord, message: p.Message) -> bool | None:
        """True if sent; None if its queue is full (try later); False if the peer is gone (it was lost)."""
        try:
            self.socket.send_multipart([denoiser.identity, *p.encode(message)], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return None
        except zmq.ZMQError as err:
            if err.errno == zmq.EHOSTUNREACH:  # ROUTER_MANDATORY: the peer is gone
                self.table.lose(denoiser.identity, f"denoiser {denoiser.name} disconnected")
                return False
            raise

    def _peer_key(self, frame: zmq.Frame) -> str | None:
        """The CURVE key ZAP authenticated the peer with, or None without CURVE."""
        if self._auth is None:
            return None
        try:
            return "curve:" + frame.get("User-Id")
        except zmq.ZMQError:
            return None

    def _receive(self) -> None:
        frames = self.socket.recv_multipart(copy=False)
        identity, body = frames[0].bytes, [frame.bytes for frame in frames[1:]]
        try:
            message = p.decode(body)
        except p.ProtocolError as err:
            self.report(f"dropped a bad message from a peer: {err}")
            return
        now = time.monotonic()
        self.last_peer_seen = now
        if isinstance(message, p.Ready):
            name = f"{message.worker}[{message.pid}]@{message.device}"
            if self.table.attach(identity, name, message.credits, now, message.out_dir, message.settings_id,
                                 key=self._peer_key(frames[1])) is None:
                self._send_to(identity, p.Bye(f"denoiser {name} is quarantined for this run"))
                return
            self.report(f"denoiser {message.worker} (pid {message.pid}, {message.device}) attached with "
                        f"{message.credits} credits")
            return
        denoiser = self.table.heard(identity, now)
        if denoiser is None:
            if isinstance(message, p.Dead):
                self.report(f"a denoiser died before it was ready: {message.reason}")
            # Otherwise: purged as dead, or not READY yet; it will READY (again) when heartbeats stop.
            return
        if isinstance(message, p.Done):
            if self.table.finish(identity, message.job_id, message.attempt,
                                 [{"file": i.file, "sha256": i.sha256} for i in message.images], message.seconds,
                                 now):
                self.watcher.finished(message)
        elif isinstance(message, p.Progress):
            if self.table.progressed(identity, message.job_id, message.attempt, now):
                self.watcher.progressed(message)
        elif isinstance(message, p.Error):
            self.table.fail(identity, message.job_id, message.attempt, message.reason, message.scope, now)
        elif isinstance(message, p.Dead):
            self.table.lose(identity, f"denoiser {denoiser.name} died: {message.reason}")
        elif isinstance(message, p.Bye):
            self._byes += 1
            self.table.lose(identity, f"denoiser {denoiser.name} left", quiet=True, orderly=True)
        elif isinstance(message, (p.Job, p.Cancel)):
            self.report(f"dropped a {message.TYPE} sent by denoiser {denoiser.name}; only the encoder sends those")

    # ---- shutdown ----
    def close(self, reason: str = "encoder finished", dead: bool = False, ack_timeout_s: float = 3.0) -> None:
        """Say BYE (or DEAD) and wait for each denoiser's BYE back. A DEALER with IMMEDIATE drops unread
        messages when its peer disconnects, so closing straight after sending could lose the BYE itself."""
        farewell: p.Message = p.Dead(reason) if dead else p.Bye(reason)
        waiting = {identity: denoiser.name for identity, denoiser in self.table.denoisers.items()}
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
        self.monitor.close()
        self.socket.close(linger=500)
        self.wakeup.close()
        if self._auth is not None:
            self._auth.stop()
        self.context.term()
