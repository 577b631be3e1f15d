"""The denoiser's runtime: one image batch at a time, loading the model on first need and skipping images that
are already written."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdxl_split.denoiser_service.naming import ImageBatch
from sdxl_split.denoiser_service.outputs import OutputDir, WrittenImage
from sdxl_split.shared.errors import JobError

if TYPE_CHECKING:  # torch: loaded only once something needs rendering
    from sdxl_split.denoiser_service.denoise import Denoiser, OnStep


@dataclass
class RenderStats:
    jobs: int = 0
    images: int = 0
    existing: int = 0
    failed_jobs: int = 0
    fp32_retries: int = 0
    # Loading the model, apart from rendering: a short run's seconds per image must not hide the load in them.
    load_seconds: float = 0.0
    render_seconds: float = 0.0

    @property
    def seconds_per_image(self) -> float:
        return self.render_seconds / self.images if self.images else 0.0


class Renderer:
    """Loads the denoiser on first need, so a run whose images all exist never touches the UNet."""

    def __init__(self, load: Callable[[], Denoiser], out: OutputDir) -> None:
        self._load = load
        self._denoiser: Denoiser | None = None
        self.out = out
        self.stats = RenderStats()
        # The preview decoder (denoiser_service.previews), made by the first job that asks for previews.
        self.previews = None

    @property
    def denoiser(self) -> Denoiser:
        if self._denoiser is None:
            started = time.perf_counter()
            self._denoiser = self._load()
            self.stats.load_seconds = time.perf_counter() - started
        return self._denoiser

    def run(self, batch: ImageBatch, on_step: OnStep | None = None) -> list[WrittenImage]:
        """Render (or find) every image of the batch. Raises JobError for a per-job failure."""
        self.stats.jobs += 1
        if all(self.out.exists(name) for name in batch.filenames):
            self.stats.existing += batch.count
            return [self.out.adopt(name, meta) for name, meta in zip(batch.filenames, batch.metas)]
        denoiser = self.denoiser  # loaded (and timed) before the render's clock starts
        started = time.perf_counter()
        try:
            decoded = denoiser.render(batch.record, batch.seed, batch.count, batch.loras, batch.config, on_step)
        except JobError:
            self.stats.failed_jobs += 1
            raise
        self.stats.render_seconds += time.perf_counter() - started
        self.stats.fp32_retries += int(decoded.retried_fp32)
        written = [self.out.write(name, image, meta)
                   for name, image, meta in zip(batch.filenames, decoded.images, batch.metas)]
        self.stats.images += sum(not w.existed for w in written)
        self.stats.existing += sum(w.existed for w in written)
        return written
