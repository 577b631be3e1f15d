"""Runs a set of child processes for `run`: denoisers first, then the encoder once they hold their models; waits
for them together, and turns Ctrl-C or SIGTERM into a drain. It knows the children only as entry points."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from sdxl_split.shared.processes import Child, spawn_child, wait_until_ready

READY_TIMEOUT_S = 1800.0
DRAIN_TIMEOUT_S = 30.0


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
    children: list[Child]
    interrupted: bool


def supervise(denoisers: list[ChildSpec], encoder: ChildSpec, notice: Callable[[str], None]) -> Outcome:
    children: list[Child] = []
    outcome = Outcome(children, interrupted=False)

    def forward(signum, frame) -> None:
        if outcome.interrupted:
            raise KeyboardInterrupt
        outcome.interrupted = True
        notice("stopping: children finish in-flight images; Ctrl-C again to abort")
        if signum == signal.SIGINT:
            return  # Ctrl-C already reached every child (one process group); a second signal would abort them
        for child in children:
            if child.process.is_alive() and child.process.pid:
                os.kill(child.process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        children.extend(spec.start() for spec in denoisers)
        # The encoder starts once the denoisers hold their models, so none misses its BYE.
        wait_until_ready(children, READY_TIMEOUT_S)
        children.append(encoder.start())
        wait_until_ready(children, READY_TIMEOUT_S)
        children[-1].process.join()
        for child in children:
            child.process.join(timeout=DRAIN_TIMEOUT_S)
            if child.process.is_alive() and child.process.pid:
                os.kill(child.process.pid, signal.SIGTERM)  # missed the BYE: drain and exit
                child.process.join(timeout=DRAIN_TIMEOUT_S)
        for child in children:
            child.poll_messages()
    finally:
        for child in children:
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(timeout=10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome
