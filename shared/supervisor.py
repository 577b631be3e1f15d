"""Runs a set of child processes for `run`: the encoder and the denoisers start together, readiness is awaited
while watching each one is alive, and Ctrl-C or SIGTERM (to the group or to this process alone) becomes one
SIGTERM per child: a drain. It knows the children only as entry points."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from sdxl_split.shared.processes import Child, spawn_child, wait_for_exit, wait_until_ready

READY_TIMEOUT_S = 1800.0
# After the encoder has finished: denoisers answer its BYE, or finish their drain, within this.
EXIT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ChildSpec:
    """One child: `target(conn, spec_json, verbosity)` in a fresh interpreter."""

    name: str
    target: Callable[..., None]
    spec_json: str
    verbosity: int = 0

    def start(self) -> Child:
        return spawn_child(self.name, self.target, self.spec_json, self.verbosity)


@dataclass
class Outcome:
    encoder: Child
    denoisers: list[Child]
    interrupted: bool

    @property
    def children(self) -> list[Child]:
        return [*self.denoisers, self.encoder]


def _terminate(children: list[Child]) -> None:
    for child in children:
        if child.process.is_alive() and child.process.pid:
            os.kill(child.process.pid, signal.SIGTERM)


def supervise(denoisers: list[ChildSpec], encoder: ChildSpec, notice: Callable[[str], None]) -> Outcome:
    started: list[Child] = []
    interrupted = False

    def forward(signum, frame) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt  # the second one: the finally below stops every child now
        interrupted = True
        notice("stopping: children finish in-flight images; Ctrl-C again to abort")
        _terminate(started)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # All at once: the encoder imports, binds and encodes while the denoisers load their models. One that
        # is still loading when the encoder has finished is told to stop below.
        started.extend(spec.start() for spec in denoisers)
        started.append(encoder.start())
        wait_until_ready(started, READY_TIMEOUT_S)
        wait_for_exit([started[-1]])
        # The encoder is done: every job is rendered, failed or left. Denoisers that answered its BYE have sent
        # their result and are exiting; one that never attached (still loading, say) is told to stop.
        for child in started[:-1]:
            child.poll_messages()
        _terminate([child for child in started[:-1] if child.result is None])
        wait_for_exit(started, EXIT_TIMEOUT_S)
    finally:
        for child in started:
            if child.process.is_alive():
                child.process.kill()
        wait_for_exit(started, 10.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return Outcome(encoder=started[-1], denoisers=started[:-1], interrupted=interrupted)
