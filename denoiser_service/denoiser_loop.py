"""The denoiser's link loop, on the thread that owns its DEALER socket: announces credit, hands JOBs to the render
thread as they arrive, heartbeats, and reconnects with backoff."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from sdxl_split.denoiser_service.job_control import JobControl
from sdxl_split.shared import protocol as p
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.handshakes import HandshakeMonitor, denoiser_side
from sdxl_split.shared.security import make_curve_client
from sdxl_split.shared.wakeup import Wakeup, watch_stop

log = logging.getLogger("sdxl_split.denoiser")
MAX_BACKOFF_S = 16.0


@dataclass(frozen=True)
class DenoiserLoopConfig:
    endpoint: str
    credits: int = 2
    # Keep serving encode runs one after another instead of exiting after the first one's BYE.
    serve: bool = False
    # Key folder of this GPU box from `sdxl-split keys init` (<name>.key_secret + server.key); None = no CURVE.
    curve_dir: Path | None = None
    name: str = socket.gethostname()
    device: str = "cpu"
    out_dir: str = ""
    # Digest of the pixel-deciding render settings (see Ready.settings_id).
    settings_id: str = ""
    heartbeat_s: float = p.HEARTBEAT_INTERVAL_S
    liveness: int = p.HEARTBEAT_LIVENESS


# Renders one JOB; returns the DONE or ERROR to send back. Runs on the render thread.
RenderFn = Callable[[p.Job, JobControl], "p.Done | p.Error"]


@dataclass
class LinkStats:
    jobs_done: int = 0
    jobs_failed: int = 0
    reconnects: int = 0
    dropped_messages: int = 0


@dataclass
class _LinkState:
    """Where one denoiser loop stands."""

    loading: Future
    render: RenderFn | None = None
    # JOBs received and not yet started; the render thread runs one at a time.
    pending: deque[p.Job] = field(default_factory=deque)
    current: Future | None = None
    # The running job's control: its steps go out through this loop, and a CANCEL reaches it here.
    control: JobControl | None = None
    announced: bool = False  # READY sent on this connection
    said_waiting: bool = False  # told the user it waits for an encoder
    finishing: bool = False  # BYE received or stop requested: finish the current job, then leave
    last_heard: float = 0.0
    next_beat: float = 0.0


class DenoiserLoop:
    def __init__(self, config: DenoiserLoopConfig, report: Callable[[str], None] = log.warning) -> None:
        self.config = config
        self.report = report
        self.context = zmq.Context()
        self.socket: zmq.Socket | None = None
        self.stats = LinkStats()
        self._backoff = 1.0
        self.monitor: HandshakeMonitor | None = None
        # Messages the render thread posts (a job's steps and previews); this loop, which owns the socket, sends them.
        self._outbox: queue.SimpleQueue[p.Message] = queue.SimpleQueue()
        self._wakeup: Wakeup | None = None
        self._said: set[str] = set()  # handshake failures already explained, across reconnects

    def _connect(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        if self.socket is not None:
            self.socket.close(linger=200)  # lets a BYE ack out before we reconnect
        self.socket = self.context.socket(zmq.DEALER)
        p.configure_dealer(self.socket)
        config = self.config
        self.monitor = HandshakeMonitor(
            self.socket, lambda event, value: denoiser_side(event, value, config.endpoint, config.curve_dir),
            self.report, self._said)
        if self.config.curve_dir is not None:
            secrets = sorted(self.config.curve_dir.glob("*.key_secret"))
            if len(secrets) != 1:
                raise UserError(f"--curve {self.config.curve_dir} must hold exactly one *.key_secret (found "
                                f"{len(secrets)}); pass this GPU box's denoisers/NAME/ folder from `keys init`")
            make_curve_client(self.socket, secrets[0], self.config.curve_dir / "server.key")
        try:
            self.socket.connect(self.config.endpoint)
        except zmq.ZMQError as err:
            raise UserError(f"cannot connect to {self.config.endpoint!r} ({err.strerror}); use tcp://HOST:PORT "
                            "or ipc://PATH") from None

    def _send(self, message: p.Message) -> bool:
        assert self.socket is not None
        try:
            self.socket.send_multipart(p.encode(message), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected yet (IMMEDIATE) or queue full
            return False

    def _ready(self) -> p.Ready:
        return p.Ready(credits=self.config.credits, worker=self.config.name[:128], pid=os.getpid(),
                       device=self.config.device[:64], out_dir=self.config.out_dir,
                       settings_id=self.config.settings_id)

    def run(self, load: Callable[[], RenderFn], stop: threading.Event) -> LinkStats:
        """Serve until the encoder says BYE (or forever with serve=True) or `stop` is set."""
        # Connect first: a bad endpoint or key file fails now, not after minutes of loading weights.
        self._connect()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        wakeup = self._wakeup = Wakeup()
        watch_stop(stop, wakeup)
        # Load on the render thread so heartbeats keep flowing while multi-GB weights load.
        state = _LinkState(loading=executor.submit(load))
        state.loading.add_done_callback(lambda _: wakeup.set())
        try:
            while True:
                self._turn(state, stop, executor, wakeup)
                if state.finishing and state.current is None:
                    self._send(p.Bye("denoiser stopping"))
                    return self.stats
                self._wait(state, wakeup)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            wakeup.close()
            if self.monitor is not None:
                self.monitor.close()
            if self.socket is not None:
                self.socket.close(linger=500)
            self.context.term()

    def _turn(self, state: _LinkState, stop: threading.Event, executor: ThreadPoolExecutor, wakeup: Wakeup) -> None:
        """Everything that is due now: readiness, heartbeat, liveness, a finished render, the next render."""
        hb = self.config.heartbeat_s
        now = time.monotonic()
        if state.render is None and state.loading.done():
            try:
                state.render = state.loading.result()
            except BaseException as err:
                # Tell the encoder now rather than let it wait out three heartbeats.
                self._send(p.Dead(p.reason_text(f"{type(err).__name__}: {err}")))
                raise
        if state.render is not None and not state.announced and not state.finishing:
            state.announced = self._send(self._ready())
            state.last_heard = time.monotonic()
            if not state.announced and not state.said_waiting:
                # IMMEDIATE: no encoder is there to take the READY yet. Said once, so a user knows where it looks.
                self.report(f"waiting for an encoder at {self.config.endpoint} (start `sdxl-split encode` there, or "
                            "pass --connect)")
                state.said_waiting = True
        if now >= state.next_beat:
            self._send(p.Heartbeat())
            state.next_beat = now + hb
        if state.announced and now - state.last_heard > hb * self.config.liveness:
            self._reconnect(state)
            return
        self._send_posted()
        if state.current is not None and state.current.done():
            reply = state.current.result()
            if state.control is not None and state.control.cancelled.is_set():
                step, steps = state.control.last_step
                self.report(f"stopped job {reply.job_id[:12]} at step {step} of {steps}: cancelled by the encoder")
            self._send(reply)
            if isinstance(reply, p.Done):
                self.stats.jobs_done += 1
            else:
                self.stats.jobs_failed += 1
            state.current, state.control = None, None
        if stop.is_set() and not state.finishing:
            # Drain: the job on the GPU finishes and is reported; queued ones go back via BYE.
            state.finishing = True
            state.pending.clear()
        if state.current is None and state.pending and state.render is not None and not state.finishing:
            job = state.pending.popleft()
            state.control = JobControl(job, self._post)
            state.current = executor.submit(self._render_one, state.render, job, state.control)
            state.current.add_done_callback(lambda _: wakeup.set())

    def _post(self, message: p.Message) -> None:
        """From the render thread: send this when the loop next turns (now: it is woken)."""
        self._outbox.put(message)
        if self._wakeup is not None:
            self._wakeup.set()

    def _send_posted(self) -> None:
        while True:
            try:
                self._send(self._outbox.get_nowait())
            except queue.Empty:
                return

    def _cancel(self, state: _LinkState, cancel: p.Cancel) -> None:
        """Stop a job the encoder no longer wants: one still waiting is answered at once; the running one stops at
        its next step and is answered when it does."""
        for job in list(state.pending):
            if (job.job_id, job.attempt) == (cancel.job_id, cancel.attempt):
                state.pending.remove(job)
                self._send(p.Error(job_id=job.job_id, attempt=job.attempt, reason=p.reason_text(cancel.reason)))
        control = state.control
        if control is not None and (control.job.job_id, control.job.attempt) == (cancel.job_id, cancel.attempt):
            control.cancelled.set()

    def _reconnect(self, state: _LinkState) -> None:
        self.stats.reconnects += 1
        self.report(f"encoder silent for {self.config.liveness} heartbeats; reconnecting in {self._backoff:.0f} s")
        state.pending.clear()  # the encoder re-queues whatever it had sent us
        time.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        self._connect()
        state.announced = False

    def _wait(self, state: _LinkState, wakeup: Wakeup) -> None:
        """Sleep until a message, a finished load or render, a stop request, or the next heartbeat."""
        assert self.socket is not None
        assert self.monitor is not None
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(wakeup, zmq.POLLIN)
        poller.register(self.monitor.socket, zmq.POLLIN)
        timeout_ms = max(0.0, state.next_beat - time.monotonic()) * 1000
        events = dict(poller.poll(timeout_ms))
        wakeup.clear()
        if self.monitor.socket in events:
            self.monitor.events()  # a failed handshake is explained, once
        if self.socket not in events:
            return
        while self.socket.poll(0, zmq.POLLIN):
            message = self._receive()
            if message is None:
                continue
            state.last_heard = time.monotonic()
            self._backoff = 1.0
            if isinstance(message, p.Job):
                if not state.finishing:  # else the encoder re-queues it when our BYE arrives
                    state.pending.append(message)
            elif isinstance(message, p.Cancel):
                self._cancel(state, message)
            elif isinstance(message, (p.Bye, p.Dead)):
                self._send(p.Bye("acknowledged"))  # the encoder waits for this before closing
                state.pending.clear()
                if self.config.serve:
                    self.report(f"encoder finished ({getattr(message, 'reason', '')}); waiting for the next one")
                    self._connect()
                    state.announced = False
                else:
                    state.finishing = True

    def _receive(self) -> p.Message | None:
        assert self.socket is not None
        frames = self.socket.recv_multipart()
        try:
            return p.decode(frames)
        except p.ProtocolError as err:
            self.stats.dropped_messages += 1
            self.report(f"dropped a bad message from the encoder: {err}")
            job = p.job_identity(frames)
            if job is not None:
                # Say so: the encoder would otherwise hold the job, and our credit, until we die.
                self._send(p.Error(job_id=job[0], attempt=job[1], reason=p.reason_text(f"JOB refused: {err}")))
            return None

    @staticmethod
    def _render_one(render: RenderFn, job: p.Job, control: JobControl) -> p.Done | p.Error:
        try:
            return render(job, control)
        except Exception as err:  # one job's failure (e.g. CUDA OOM) is reported, and the next job runs
            reason = p.reason_text(f"{type(err).__name__}: {err}")
            return p.Error(job_id=job.job_id, attempt=job.attempt, reason=reason)
