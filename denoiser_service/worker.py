"""The denoiser's DEALER: announces credit, renders JOBs as they arrive, heartbeats, and reconnects with backoff."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zmq

from sdxl_split.shared import protocol as p
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.security import make_curve_client

log = logging.getLogger("sdxl_split.denoiser")
MAX_BACKOFF_S = 16.0


@dataclass(frozen=True)
class WorkerConfig:
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
    # Test hook: seconds to sleep before each job, to make one denoiser slower than another.
    job_delay_s: float = 0.0


# Renders one JOB; returns the DONE or ERROR to send back. Runs on the render thread.
RenderFn = Callable[[p.Job], "p.Done | p.Error"]


@dataclass
class WorkerStats:
    jobs_done: int = 0
    jobs_failed: int = 0
    reconnects: int = 0
    dropped_messages: int = 0


class Worker:
    def __init__(self, config: WorkerConfig, report: Callable[[str], None] = log.warning) -> None:
        self.config = config
        self.report = report
        self.context = zmq.Context()
        self.socket: zmq.Socket | None = None
        self.stats = WorkerStats()
        self._backoff = 1.0

    def _connect(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=200)  # lets a BYE ack out before we reconnect
        self.socket = self.context.socket(zmq.DEALER)
        p.configure_dealer(self.socket)
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

    def run(self, load: Callable[[], RenderFn], stop: threading.Event) -> WorkerStats:
        """Serve until the encoder says BYE (or forever with serve=True) or `stop` is set."""
        hb = self.config.heartbeat_s
        # Connect first: a bad endpoint or key file fails now, not after minutes of loading weights.
        self._connect()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        # Load on the render thread so heartbeats keep flowing while multi-GB weights load.
        loading: Future = executor.submit(load)
        render: RenderFn | None = None
        pending: deque[p.Job] = deque()
        current: Future | None = None
        current_job: p.Job | None = None
        announced = False
        finishing = False
        last_heard = time.monotonic()
        next_beat = 0.0
        try:
            while True:
                now = time.monotonic()
                if render is None and loading.done():
                    try:
                        render = loading.result()
                    except BaseException as err:
                        # Tell the encoder now rather than let it wait out three heartbeats.
                        self._send(p.Dead(f"{type(err).__name__}: {err}"[:2000] or "load failed"))
                        raise
                if render is not None and not announced and not finishing:
                    announced = self._send(self._ready())
                    last_heard = time.monotonic()
                if now >= next_beat:
                    self._send(p.Heartbeat())
                    next_beat = now + hb
                if announced and now - last_heard > hb * self.config.liveness:
                    self.stats.reconnects += 1
                    self.report(f"encoder silent for {self.config.liveness} heartbeats; reconnecting in "
                                f"{self._backoff:.0f} s")
                    pending.clear()  # the encoder re-queues whatever it had sent us
                    time.sleep(self._backoff)
                    self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
                    self._connect()
                    announced = False
                    continue
                if current is not None and current.done():
                    reply = current.result()
                    self._send(reply)
                    if isinstance(reply, p.Done):
                        self.stats.jobs_done += 1
                    else:
                        self.stats.jobs_failed += 1
                    current, current_job = None, None
                if stop.is_set() and not finishing:
                    # Drain: the job on the GPU finishes and is reported; queued ones go back via BYE.
                    finishing = True
                    pending.clear()
                if current is None and pending and render is not None and not finishing:
                    current_job = pending.popleft()
                    current = executor.submit(self._render_one, render, current_job)
                if finishing and current is None:
                    self._send(p.Bye("denoiser stopping"))
                    return self.stats
                assert self.socket is not None
                if self.socket.poll(int(min(hb, 0.1) * 1000), zmq.POLLIN):
                    while self.socket.poll(0, zmq.POLLIN):
                        message = self._receive()
                        if message is None:
                            continue
                        last_heard = time.monotonic()
                        self._backoff = 1.0
                        if isinstance(message, p.Job):
                            if not finishing:  # else the encoder re-queues it when our BYE arrives
                                pending.append(message)
                        elif isinstance(message, (p.Bye, p.Dead)):
                            self._send(p.Bye("acknowledged"))  # the encoder waits for this before closing
                            if self.config.serve:
                                self.report(f"encoder finished ({getattr(message, 'reason', '')}); waiting for "
                                            "the next one")
                                pending.clear()
                                self._connect()
                                announced = False
                            else:
                                finishing = True
                                pending.clear()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            if self.socket is not None:
                self.socket.close(linger=500)
            self.context.term()

    def _receive(self) -> p.Message | None:
        assert self.socket is not None
        frames = self.socket.recv_multipart()
        try:
            return p.decode(frames)
        except p.ProtocolError as err:
            self.stats.dropped_messages += 1
            self.report(f"dropped a bad message from the encoder: {err}")
            return None

    def _render_one(self, render: RenderFn, job: p.Job) -> p.Done | p.Error:
        if self.config.job_delay_s:
            time.sleep(self.config.job_delay_s)
        try:
            return render(job)
        except Exception as err:  # one job's failure (e.g. CUDA OOM) is reported, and the next job runs
            return p.Error(job_id=job.job_id, attempt=job.attempt, reason=f"{type(err).__name__}: {err}"[:2000])
