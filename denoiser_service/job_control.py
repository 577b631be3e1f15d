"""What a render may do while it runs on the render thread: report its steps to the encoder (with a small preview
when one is due), and notice that its job was cancelled. Messages go out through the denoiser loop, which owns
the socket; a cancelled job stops at its next step."""

from __future__ import annotations

import threading
from collections.abc import Callable

from sdxl_split.shared import protocol as p
from sdxl_split.shared.errors import JobError


class JobCancelled(JobError):
    """The encoder cancelled this job (its HTTP client left, or interrupted it); the render stops at its next step."""


class JobControl:
    def __init__(self, job: p.Job, send: Callable[[p.Message], None] = lambda message: None) -> None:
        self.job = job
        self.cancelled = threading.Event()
        self._send = send
        self.last_step = (0, 0)  # (step, steps) reached: where a cancelled job stopped

    @property
    def reports(self) -> bool:
        """Steps are reported for jobs that want their images back (an HTTP request's), not for a prompt file's."""
        return self.job.options.return_images

    def preview_due(self, step: int, steps: int) -> bool:
        every = self.job.options.preview_every
        return bool(every) and step % every == 0 and step < steps

    def step(self, step: int, steps: int, preview: bytes = b"") -> None:
        self.last_step = (step, steps)
        if self.cancelled.is_set():
            raise JobCancelled("cancelled by the encoder")
        self._send(p.Progress(job_id=self.job.job_id, attempt=self.job.attempt, step=step, steps=steps,
                              preview=preview))
