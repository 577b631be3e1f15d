"""Faults that tests inject, in one frozen spec applied at one seam per side: the encoder's record hand-over, and
the denoiser's model load, render function and output folder. Nothing else in the code knows about them. Users never set
them: the CLI takes them only through the hidden `--fault NAME=VALUE` option."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sdxl_split.shared.errors import UserError

T = TypeVar("T")
R = TypeVar("R")
KILL_MARKER = ".sdxl-split-fault-kill"
# A held encoder goes on after this long, so a link that never renders fails its test instead of hanging it.
HOLD_LIMIT_S = 300.0
EventSink = Callable[[str, str, dict], None]


@dataclass(frozen=True)
class Faults:
    # Encoder: seconds its model thread sleeps after handing over each record (a slow encoder).
    encode_delay_s: float = 0.0
    # Encoder: after handing over this many records its model thread waits until a first image is done, so a test
    # sees rendering overlap encoding by an event, not by racing a delay.
    hold_after_records: int = 0
    # Denoiser: seconds it sleeps before each render (a slow GPU).
    render_delay_s: float = 0.0
    # Denoiser: seconds its model load takes longer (weights on a slow network disk).
    load_delay_s: float = 0.0
    # Denoiser: its Nth render (1 = the first) never returns, as a stuck CUDA call would.
    hang_on_render: int = 0
    # Denoiser: after writing this many new images the process SIGKILLs itself, between two images of a job (a
    # node lost mid-job); once per output folder (a marker file there), not once per restarted process.
    kill_after_images: int = 0

    def encoder_seam(self, on_event: EventSink) -> tuple[EventSink, Callable[[], None]]:
        """The encoder's journal-event sink and the hook its model thread calls after each record, faults in."""
        image_done = threading.Event()
        handed = 0

        def watch(event: str, job_id: str, fields: dict) -> None:
            if event == "done":
                image_done.set()
            on_event(event, job_id, fields)

        def after_record() -> None:
            nonlocal handed
            handed += 1
            time.sleep(self.encode_delay_s)
            if handed == self.hold_after_records:
                image_done.wait(HOLD_LIMIT_S)

        return (watch, after_record) if self.encode_delay_s or self.hold_after_records else (on_event, lambda: None)

    def wrap_render(self, render: Callable[..., R]) -> Callable[..., R]:
        if not (self.render_delay_s or self.hang_on_render):
            return render
        started = 0

        def faulty(job: T, *rest: Any) -> R:
            nonlocal started
            started += 1
            if started == self.hang_on_render:
                threading.Event().wait()
            time.sleep(self.render_delay_s)
            return render(job, *rest)

        return faulty

    def wrap_load(self, load: Callable[[], R]) -> Callable[[], R]:
        if not self.load_delay_s:
            return load

        def slow() -> R:
            time.sleep(self.load_delay_s)
            return load()

        return slow

    def wrap_output(self, out: T) -> T:
        return _DyingOutput(out, self.kill_after_images) if self.kill_after_images else out  # type: ignore


class _DyingOutput:
    """An output folder (denoiser_service.outputs.OutputDir) whose process dies after `after` new images."""

    def __init__(self, inner: Any, after: int) -> None:
        self._inner = inner
        self._left = after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write(self, filename: str, image: Any, meta: Any) -> Any:
        written = self._inner.write(filename, image, meta)
        self._left -= int(not written.existed)
        if self._left == 0:
            try:
                os.close(os.open(Path(self._inner.root) / KILL_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return written  # another process died already
            os.kill(os.getpid(), signal.SIGKILL)
        return written


def parse_faults(values: tuple[str, ...] | list[str]) -> Faults:
    """--fault NAME=VALUE, repeatable."""
    kinds = {field.name: field.type for field in dataclasses.fields(Faults)}
    chosen: dict[str, float | int] = {}
    for text in values:
        name, _, value = text.partition("=")
        if name not in kinds or not value:
            raise UserError(f"--fault {text!r}: expected NAME=VALUE with NAME one of {', '.join(kinds)}")
        try:
            chosen[name] = float(value) if kinds[name] in (float, "float") else int(value)
        except ValueError:
            raise UserError(f"--fault {text!r}: {value!r} is not a number") from None
    return Faults(**chosen)
