"""uvicorn's server, whose first stop signal also cancels the requests in flight. Its graceful shutdown waits for
open requests to end, and one of 1000 steps would hold Ctrl-C for minutes. And a stop it handled is not raised
again afterwards (uvicorn re-raises it for outer handlers: SIGTERM's default one would kill the process before
the engine tells its denoisers to leave)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from sdxl_split.http_service.broker import Broker


class StoppingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, broker: Broker, notice: Callable[[str], None]) -> None:
        super().__init__(config)
        self._broker = broker
        self._notice = notice
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: the broker belongs to the event loop, so the cancel is handed to it.
        if not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_requests)
        super().handle_exit(sig, frame)

    def _stop_requests(self) -> None:
        self._notice("stopping: requests in flight are cancelled (their clients get what finished); the denoisers "
                     "stop at their next step and leave")
        self._broker.cancel_all("the server is stopping")

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may take signals
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
