"""The render loop: one job (a prompt's embeddings, seed and image count) at a time, skipping finished images."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdxl_split.denoiser_service.config import SCHEDULERS, RenderConfig
from sdxl_split.denoiser_service.outputs import ImageMeta, OutputDir, WrittenImage
from sdxl_split.shared.errors import JobError
from sdxl_split.shared.jobs import image_filename, image_id, job_id
from sdxl_split.shared.loras import LoraUse
from sdxl_split.shared.prompts import MAX_SEED, PromptEntry

if TYPE_CHECKING:  # torch: `run`'s parent plans file names with this module and never loads a model
    from sdxl_split.denoiser_service.denoise import Denoiser
    from sdxl_split.shared.embeddings import Embeddings


@dataclass(frozen=True)
class RenderJob:
    job_id: str
    entry: PromptEntry
    record: Embeddings
    seed: int
    count: int
    metas: tuple[ImageMeta, ...]
    filenames: tuple[str, ...]
    loras: tuple[LoraUse, ...] = ()


@dataclass(frozen=True)
class ModelIdentity:
    """How the denoising model is named in file metadata and job ids."""

    # A1111's `Model:`: a hub id, a checkpoint's stem or a folder's name, never a local path.
    name: str
    # Identity of the denoise side's files; part of every job id.
    fingerprint: str
    # A1111's `Model hash:`: AutoV2 (first 10 hex digits of the file's sha256) for a single-file checkpoint, so
    # model-sharing sites find it; our fingerprint otherwise.
    hash: str = ""
    # The --model value in full (a path, perhaps), written only with --metadata full.
    source: str | None = None


def make_job(entry: PromptEntry, record: Embeddings, config: RenderConfig, model: ModelIdentity,
             loras: tuple[LoraUse, ...] = ()) -> RenderJob:
    job, seed, count, names = job_files(record.key, entry, config, model, loras)
    metas = []
    for index in range(count):
        metas.append(ImageMeta(
            image_id=image_id(job, index), job_id=job, index=index, seed=seed + index, prompt=entry.prompt,
            negative_prompt=entry.negative_prompt, embedding_key=record.key,
            sampler=SCHEDULERS[config.scheduler][2], model=model.name,
            model_hash=model.hash or model.fingerprint.split(":")[-1], model_source=model.source,
            config={**config.pixel_settings(), "attention": config.attention, "compile": config.compile,
                    "offload": config.offload, "vae_slicing": config.vae_slicing, "vae_tiling": config.vae_tiling,
                    "base_seed": seed, "count": count, "clip_skip": record.settings.clip_skip,
                    "prompt_2": entry.prompt_2, "negative_prompt_2": entry.negative_prompt_2,
                    "prompt_syntax": record.settings.syntax},
            lora_hashes=_hashes((u.name, u.sha256) for u in (*record.settings.loras, *loras)),
            ti_hashes=_hashes(record.settings.inversions),
        ))
    return RenderJob(job, entry, record, seed, count, tuple(metas), names, tuple(loras))


def job_files(key: str, entry: PromptEntry, config: RenderConfig, model: ModelIdentity,
              loras: tuple[LoraUse, ...] = ()) -> tuple[str, int, int, tuple[str, ...]]:
    """(job id, first seed, image count, file names) of a prompt's job: what it will write, known from the
    embedding key alone, so finished work can be found before anything is encoded."""
    seed = entry.seed if entry.seed is not None else config.seed
    count = entry.count if entry.count is not None else config.images_per_prompt
    if seed + count - 1 > MAX_SEED:
        raise JobError(f"seed {seed} with {count} images would go past {MAX_SEED} (image i uses seed+i)")
    job = job_id(key, seed, count, config.pixel_settings(), model.fingerprint, loras)
    return job, seed, count, tuple(image_filename(entry.prompt, image_id(job, index)) for index in range(count))


def _hashes(pairs) -> str | None:
    """A1111's `Lora hashes`/`TI hashes` value: "name: hash, ...", by the first 12 hex digits of each file's sha256."""
    seen = dict(pairs)
    return ", ".join(f"{name}: {sha[:12]}" for name, sha in seen.items()) or None


@dataclass
class RenderStats:
    jobs: int = 0
    images: int = 0
    existing: int = 0
    failed_jobs: int = 0
    fp32_retries: int = 0
    render_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

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

    @property
    def denoiser(self) -> Denoiser:
        if self._denoiser is None:
            self._denoiser = self._load()
        return self._denoiser

    def run(self, job: RenderJob) -> list[WrittenImage]:
        """Render (or find) every image of the job. Raises JobError for a per-job failure."""
        self.stats.jobs += 1
        if all(self.out.exists(name) for name in job.filenames):
            self.stats.existing += job.count
            return [self.out.adopt(name, meta) for name, meta in zip(job.filenames, job.metas)]
        started = time.perf_counter()
        try:
            decoded = self.denoiser.render(job.record, job.seed, job.count, job.loras)
        except JobError as err:
            self.stats.failed_jobs += 1
            self.stats.errors.append(f"line {job.entry.line}: {err}")
            raise
        self.stats.render_seconds += time.perf_counter() - started
        self.stats.fp32_retries += int(decoded.retried_fp32)
        written = [self.out.write(name, image, meta)
                   for name, image, meta in zip(job.filenames, decoded.images, job.metas)]
        self.stats.images += sum(not w.existed for w in written)
        self.stats.existing += sum(w.existed for w in written)
        return written
