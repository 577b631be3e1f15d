"""Waking a socket loop from another thread or a signal handler: a pipe its zmq poller watches beside the socket.

A finished encode or render, and a stop request, end the loop's poll at once, so nothing waits for a timeout
on the critical path; timeouts are left to heartbeats and liveness.
"""

from __future__ import annotations

import os
import threading


class Wakeup:
    """set() from any thread (or a signal handler) makes the read end readable until clear()."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        try:
            os.write(self._write, b"\0")
        except (BlockingIOError, OSError):
            pass  # full (already set), or closed while shutting down

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class StopFlag(threading.Event):
    """A stop request that also wakes every loop watching it, so a drain starts at once."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: list[Wakeup] = []

    def watch(self, wakeup: Wakeup) -> None:
        self._watchers.append(wakeup)
        if self.is_set():
            wakeup.set()

    def set(self) -> None:
        super().set()
        for wakeup in list(self._watchers):
            wakeup.set()


def watch_stop(stop: threading.Event, wakeup: Wakeup) -> None:
    """Let `stop` wake this loop when it can (a StopFlag); a plain Event is still checked on every turn."""
    if isinstance(stop, StopFlag):
        stop.watch(wakeup)
