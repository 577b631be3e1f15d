"""What a job becomes on the denoiser before anything renders: its render id, file names and PNG metadata, all
derived from the embedding key, the seed and count, the model and every pixel-deciding setting. No torch here:
`run`'s parent plans file names with this module and never loads a model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.outputs import ImageMeta
from sdxl_split.shared.errors import JobError
from sdxl_split.shared.image_settings import SCHEDULERS
from sdxl_split.shared.jobs import image_filename, image_id, render_id
from sdxl_split.shared.loras import LoraUse
from sdxl_split.shared.prompts import RANDOM_SEED, PromptEntry, random_seed, seed_range_problem

if TYPE_CHECKING:
    from sdxl_split.shared.embeddings import Embeddings


@dataclass(frozen=True)
class ModelIdentity:
    """How the denoising model is named in file metadata and render ids."""

    # A1111's `Model:`: a hub id, a checkpoint's stem or a folder's name, never a local path.
    name: str
    # Identity of the denoise side's files; part of every render id.
    fingerprint: str
    # A1111's `Model hash:`: AutoV2 (first 10 hex digits of the file's sha256) for a single-file checkpoint, so
    # model-sharing sites find it; our fingerprint otherwise.
    hash: str = ""
    # The --model value in full (a path, perhaps), written only with --metadata full.
    source: str | None = None

    @property
    def model_hash(self) -> str:
        """What the PNGs' `Model hash:` holds (A1111 shows its first 10 characters)."""
        return self.hash or self.fingerprint.split(":")[-1]


@dataclass(frozen=True)
class ImageBatch:
    """One job as this denoiser renders it: a prompt's embeddings, the seed of its first image and how many, and
    what each image is called and carries."""

    render_id: str
    entry: PromptEntry
    record: Embeddings
    seed: int
    count: int
    metas: tuple[ImageMeta, ...]
    filenames: tuple[str, ...]
    loras: tuple[LoraUse, ...] = ()
    # The settings it renders with: the denoiser's own, with what the job chose for itself.
    config: RenderConfig | None = None


def image_batch(entry: PromptEntry, record: Embeddings, config: RenderConfig, model: ModelIdentity,
                loras: tuple[LoraUse, ...] = ()) -> ImageBatch:
    render, seed, count, names = batch_files(record.key, entry, config, model, loras)
    settings = {**config.pixel_settings(), "attention": config.attention, "compile": config.compile,
                "offload": config.offload, "vae_slicing": config.vae_slicing, "vae_tiling": config.vae_tiling,
                "base_seed": seed, "count": count, "clip_skip": record.settings.clip_skip,
                "prompt_2": entry.prompt_2, "negative_prompt_2": entry.negative_prompt_2,
                "prompt_syntax": record.settings.syntax}
    metas = tuple(ImageMeta(
        image_id=image_id(render, index), render_id=render, index=index, seed=seed + index, prompt=entry.prompt,
        negative_prompt=entry.negative_prompt, embedding_key=record.key, sampler=SCHEDULERS[config.scheduler][2],
        model=model.name, model_hash=model.model_hash, model_source=model.source,
        config=settings, lora_hashes=_lora_hashes((*record.settings.loras, *loras)),
        ti_hashes=_hashes(record.settings.inversions)) for index in range(count))
    return ImageBatch(render, entry, record, seed, count, metas, names, tuple(loras), config)


def batch_files(key: str, entry: PromptEntry, config: RenderConfig, model: ModelIdentity,
                loras: tuple[LoraUse, ...] = ()) -> tuple[str, int, int, tuple[str, ...]]:
    """(render id, first seed, image count, file names) of a prompt's job: what it will write, known from the
    embedding key alone, so finished work can be found before anything is encoded."""
    seed = entry.seed if entry.seed is not None else config.seed
    if seed == RANDOM_SEED:  # a job from an encoder that left the seed to a denoiser started with --seed -1
        seed = random_seed()
    count = entry.count if entry.count is not None else config.images_per_prompt
    if problem := seed_range_problem(seed, count):
        raise JobError(problem)
    render = render_id(key, seed, count, config.pixel_settings(), model.fingerprint, loras)
    return render, seed, count, tuple(image_filename(entry.prompt, image_id(render, index)) for index in range(count))


def _hashes(pairs: Iterable[tuple[str, str]]) -> str | None:
    """A1111's `Lora hashes`/`TI hashes` value: "name: hash, ...", names without the `:` and `,` that would break
    the list, hashes to their first 12 hex digits (a textual inversion's: the sha256 of the whole file)."""
    seen = {name.replace(":", "").replace(",", ""): digest[:12] for name, digest in pairs}
    return ", ".join(f"{name}: {digest}" for name, digest in seen.items()) or None


def _lora_hashes(uses: tuple[LoraUse, ...]) -> str | None:
    """A LoRA's A1111 hash is its `sshs_model_hash` or the sha256 of its tensor data (shared.loras); a record made
    before that was kept falls back to the file's sha256."""
    return _hashes((use.name, use.a1111_hash or use.sha256) for use in uses)
