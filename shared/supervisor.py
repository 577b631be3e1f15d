"""Runs a set of child processes for `run`. They start first and import torch while this process plans the
work, which needs only their hello (what CUDA devices torch sees); then each gets its spec. Readiness is awaited
while watching each one is alive, and Ctrl-C or SIGTERM (to the group or to this process alone) becomes one
SIGTERM per child: a drain. It knows the children only as entry points."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from sdxl_split.shared.processes import Child, spawn_child, stopping_line, wait_for_exit, wait_until

# A child's hello comes after its torch import: seconds, or minutes the first time on a cold, slow disk.
HELLO_TIMEOUT_S = 600.0
# Readiness comes after the model load (minutes for full SDXL with CPU offload).
READY_TIMEOUT_S = 1800.0
# After the encoder has finished: denoisers answer its BYE, or finish their drain, within this.
EXIT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ChildSpec:
    """One child: `entry` ("module:function") is called in a fresh interpreter as function(hooks, spec_json)."""

    name: str
    entry: str


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


class ChildGroup:
    """`with ChildGroup(...) as group`: the children start on entering, and any still running on leaving (the
    plan found nothing to do, bad input, Ctrl-C) are killed; none has done any work before `run` gave it a spec."""

    def __init__(self, denoisers: list[ChildSpec], encoder: ChildSpec, verbosity: int,
                 notice: Callable[[str], None]) -> None:
        self._specs = [*denoisers, encoder]
        self._verbosity = verbosity
        self._notice = notice
        self._started: list[Child] = []

    def __enter__(self) -> ChildGroup:
        # All at once: the encoder imports, binds and encodes while the denoisers load their models.
        self._started.extend(spawn_child(spec.name, spec.entry, self._verbosity) for spec in self._specs)
        return self

    def __exit__(self, *exc) -> None:
        for child in self._started:
            if child.process.is_alive():
                child.process.kill()
        wait_for_exit(self._started, 10.0)

    def cuda_devices(self) -> int:
        """CUDA devices torch sees on this machine, from the children's hellos."""
        wait_until(self._started, lambda child: child.said_hello, "started", HELLO_TIMEOUT_S)
        return self._started[-1].cuda_devices or 0

    def run(self, denoiser_spec_json: str, encoder_spec_json: str) -> Outcome:
        """Give each child its spec, wait until the encoder has finished, and collect every child's result."""
        started = self._started
        interrupted = False

        def forward(signum, frame) -> None:
            nonlocal interrupted
            if interrupted:
                raise KeyboardInterrupt  # the second one: __exit__ stops every child now
            interrupted = True
            self._notice(stopping_line(signum))
            _terminate(started)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in started[:-1]:
                child.send_spec(denoiser_spec_json)
            started[-1].send_spec(encoder_spec_json)
            wait_until(started, lambda child: child.ready, "ready", READY_TIMEOUT_S)
            wait_for_exit([started[-1]])
            # The encoder is done: every job is rendered, failed or left. Denoisers that answered its BYE have sent
            # their result and are exiting; one that never attached (still loading, say) is told to stop.
            for child in started[:-1]:
                child.poll_messages()
            _terminate([child for child in started[:-1] if child.result is None])
            wait_for_exit(started, EXIT_TIMEOUT_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return Outcome(encoder=started[-1], denoisers=started[:-1], interrupted=interrupted)
