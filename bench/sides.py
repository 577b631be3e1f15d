"""What each kind of row does inside its process: load (phase "load"), one untimed warm-up, timed repeats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from sdxl_split.bench.job import RowTask
from sdxl_split.bench.timing import WARMUP_STEPS, timed_ms
from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.denoise import Denoiser
from sdxl_split.denoiser_service.pipeline import build_denoiser, use_scheduler
from sdxl_split.encoder_service.text_side import TextSide
from sdxl_split.shared.embedding_cache import Bad, EmbeddingCache, Hit
from sdxl_split.shared.embeddings import DTYPES, TENSOR_NAMES, Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings, embedding_key
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.loading import load_partial_pipeline
from sdxl_split.shared.models.resolve import ModelSource


@dataclass(frozen=True)
class Measured:
    warmup_ms: float
    latencies_ms: list[float]
    # Process CPU time of each timed repeat (all threads).
    cpu_ms: list[float]
    # Wall ms each timed repeat spent in each meter phase (denoise, decode, encode).
    phase_ms: dict[str, list[float]]
    # Images one repeat produces (None for the encoder, which produces embeddings).
    images_per_repeat: int | None
    # Pipeline components actually held by this process: the proof that a denoiser row has no text encoder.
    components: list[str]


def _held(pipe) -> list[str]:
    return sorted(name for name, part in pipe.components.items() if part is not None)


def _repeat(work: Callable[[int | None], object], job: RowTask, device: str, meter: MemoryMeter
            ) -> tuple[float, list[float], list[float], dict[str, list[float]]]:
    """Warm-up wall ms, then each repeat's wall and CPU ms, and the ms each repeat spent in each meter phase.
    `work(steps)` runs one repeat; the warm-up runs WARMUP_STEPS denoising steps, which is enough to compile,
    pick kernels and grow the allocator (nothing depends on the step count) at a fraction of the cost."""
    warmup, _ = timed_ms(lambda: work(WARMUP_STEPS), device)
    timed, phase_ms = [], {}
    for _ in range(job.repeats):
        first = len(meter.phases)
        timed.append(timed_ms(lambda: work(None), device))
        spent: dict[str, float] = {}
        for phase in meter.phases[first:]:
            spent[phase.phase] = spent.get(phase.phase, 0.0) + phase.seconds * 1000.0
        for name, ms in spent.items():
            phase_ms.setdefault(name, []).append(ms)
    return warmup, [wall for wall, _ in timed], [cpu for _, cpu in timed], phase_ms


def run_encoder(job: RowTask, source: ModelSource, meter: MemoryMeter, loaded: Callable[[], None]) -> Measured:
    """Encode every prompt (one at a time, as `encode` does by default) and leave the results in the cache."""
    settings = job.encoding_settings()
    entries = job.entries()
    with meter.phase("load"):
        text_side = TextSide(source, job.encoder_device, settings.dtype)
    loaded()
    encoded: list = []

    def once(steps: int | None) -> None:
        encoded[:] = [text_side.encode([entry], settings.clip_skip)[0] for entry in entries]

    with meter.phase("encode"):
        warmup, latencies, cpu, phases = _repeat(once, job, job.encoder_device, meter)
    cache = EmbeddingCache(job.global_options().embeddings_dir)
    for entry, result in zip(entries, encoded):
        cache.store(Embeddings(key=embedding_key(entry.texts(), settings), texts=entry.texts(), settings=settings,
                               tensors=result.tensors, truncated=bool(result.dropped)))
    return Measured(warmup, latencies, cpu, phases, None, _held(text_side.pipe))


def cached_records(job: RowTask) -> list[Embeddings]:
    """The prompts' embeddings from the cache; a denoiser row never encodes anything itself."""
    settings = job.encoding_settings()
    cache = EmbeddingCache(job.global_options().embeddings_dir)
    records = []
    for entry in job.entries():
        found = cache.lookup(embedding_key(entry.texts(), settings))
        if not isinstance(found, Hit):
            raise UserError(f"no cached embeddings for {entry.prompt[:60]!r}"
                            + (f" ({found.problem})" if isinstance(found, Bad) else "") + "; run the encoder row first")
        records.append(found.record)
    return records


def _steps(config: RenderConfig, steps: int | None) -> RenderConfig:
    """The row's settings, or its warm-up's (fewer steps)."""
    return config if steps is None else replace(config, steps=min(steps, config.steps))


def run_denoiser(job: RowTask, source: ModelSource, meter: MemoryMeter, loaded: Callable[[], None]) -> Measured:
    config = job.render_config()
    records = cached_records(job)
    denoiser = build_denoiser(source, config, meter)
    loaded()

    def once(steps: int | None) -> None:
        for record in records:
            denoiser.render(record, config.seed, config.images_per_prompt, config=_steps(config, steps))

    warmup, latencies, cpu, phases = _repeat(once, job, config.device, meter)
    return Measured(warmup, latencies, cpu, phases, config.images_per_prompt * len(records), _held(denoiser.pipe))


def load_monolith(source: ModelSource, config: RenderConfig):
    """The whole SDXL pipeline, text encoders included, as a single-process user would load it."""
    pipe = load_partial_pipeline(source, {}, DTYPES[config.dtype], add_watermarker=False)
    use_scheduler(pipe, config.scheduler)
    pipe.to(torch.device(config.device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_monolith(job: RowTask, source: ModelSource, meter: MemoryMeter, loaded: Callable[[], None]) -> Measured:
    """Each repeat encodes and renders in this one process: phases encode, then denoise and decode."""
    config = job.render_config()
    if config.offload != "none" or config.compile or config.vae != "full" or config.vae_slicing:
        raise ValueError("the monolith row runs the plain baseline only")
    shared = job.encoding_settings()
    # Its own embeddings, in its own dtype; they never touch the cache.
    settings = EncodingSettings(fingerprint=shared.fingerprint, clip_skip=None, dtype=config.dtype,
                                force_zeros=shared.force_zeros)
    entries = job.entries()
    with meter.phase("load"):
        pipe = load_monolith(source, config)
    loaded()
    device = torch.device(config.device)

    denoiser = Denoiser(pipe, config, meter)

    @torch.inference_mode()
    def once(steps: int | None) -> None:
        for entry in entries:
            with meter.phase("encode"):
                # What StableDiffusionXLPipeline.__call__(prompt=...) runs first, called out to time it apart.
                tensors = pipe.encode_prompt(prompt=[entry.prompt], prompt_2=[entry.prompt], device=device,
                                             num_images_per_prompt=1, do_classifier_free_guidance=True)
            record = Embeddings(key=embedding_key(entry.texts(), settings), texts=entry.texts(), settings=settings,
                                tensors=dict(zip(TENSOR_NAMES, tensors)))
            denoiser.render(record, config.seed, config.images_per_prompt, config=_steps(config, steps))

    warmup, latencies, cpu, phases = _repeat(once, job, config.device, meter)
    return Measured(warmup, latencies, cpu, phases, config.images_per_prompt * len(entries), _held(pipe))


RUNNERS: dict[str, Callable[[RowTask, ModelSource, MemoryMeter, Callable[[], None]], Measured]] = {
    "encoder": run_encoder,
    "denoiser": run_denoiser,
    "monolith": run_monolith,
}
