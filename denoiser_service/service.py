"""The denoiser as a service, the counterpart of encoder_service/streaming.py: render a prompt file's cached
embeddings, or serve a live encoder's jobs, from one frozen spec. Notices and progress go to callbacks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sdxl_split.denoiser_service.denoise import Denoiser
from sdxl_split.denoiser_service.lora_bank import LoraBank
from sdxl_split.denoiser_service.outputs import OutputDir
from sdxl_split.denoiser_service.render_loop import Renderer, RenderJob, RenderStats, make_job
from sdxl_split.denoiser_service.spec import DenoiserSpec, ServeSpec
from sdxl_split.shared import protocol as p
from sdxl_split.shared.devices import cuda_index
from sdxl_split.shared.embedding_cache import Bad, EmbeddingCache, Hit
from sdxl_split.shared.encoding_settings import EncodingSettings, entry_key
from sdxl_split.shared.errors import JobError, UserError
from sdxl_split.shared.jobs import settings_id
from sdxl_split.shared.loras import LoraFinder
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.threads import use_threads

Notice = Callable[[str], None]


def denoiser_loader(spec: DenoiserSpec, meter: MemoryMeter, notice: Notice) -> Callable[[], Denoiser]:
    """Loads on first call; diffusers is imported only then, so a run whose images all exist never pays."""
    config = spec.config

    def load() -> Denoiser:
        from sdxl_split.denoiser_service.pipeline import load_weights, place

        notice(f"loading UNet + {config.vae} VAE of {spec.source.description} on {config.device} ({config.dtype}, "
               f"attention {config.attention}, offload {config.offload}"
               f"{'' if config.quantize == 'none' else ', quantize ' + config.quantize})")
        if config.compile or config.compile_vae:
            notice("--compile: the first image compiles (slow; minutes with max-autotune); a new size or batch "
                   "recompiles")
        with meter.phase("load"):
            pipe = load_weights(spec.source, config)
            finder = LoraFinder(spec.extras.lora_dir, spec.cache_dir)
            bank = LoraBank(pipe, finder, spec.lora_cache)
            if spec.fuse_lora:
                # Into the plain weights, before fused projections, offload copies or compilation take them over.
                loras = [(finder.find(name), scale) for name, scale in spec.extras.run_loras]
                bank.fuse(tuple(lora.use(scale) for lora, scale in loras if lora.unet))
            place(pipe, config)
        return Denoiser(pipe, config, meter, loras=bank)

    return load


@dataclass
class CacheRender:
    """What rendering a prompt file's cached jobs did."""

    stats: RenderStats
    memory: dict
    errors: list[tuple[PromptEntry, str]] = field(default_factory=list)


def find_cached(spec: DenoiserSpec, entries: tuple[PromptEntry, ...], settings: EncodingSettings,
                cache: EmbeddingCache) -> tuple[list[RenderJob], list[tuple[PromptEntry, str | None]]]:
    """The jobs whose embeddings are cached, and the entries with no valid cache file (and why, if it is bad)."""
    jobs: list[RenderJob] = []
    missing: list[tuple[PromptEntry, str | None]] = []
    resolver = spec.extras.resolver(spec.cache_dir)
    for entry in entries:
        extras = resolver.resolve(entry)
        found = cache.lookup(entry_key(entry, settings, extras))
        if isinstance(found, Hit):
            jobs.append(make_job(entry, found.record, spec.config, spec.identity, extras.unet_loras))
        else:
            missing.append((entry, found.problem if isinstance(found, Bad) else None))
    return jobs, missing


def render_jobs(spec: DenoiserSpec, jobs: list[RenderJob], notice: Notice,
                on_images: Callable[[int], None] = lambda n: None,
                on_error: Callable[[PromptEntry, str], None] = lambda entry, reason: None) -> CacheRender:
    """Render each job (or find its images already there); a job that fails is reported and the rest go on."""
    use_threads(spec.threads)
    meter = MemoryMeter(cuda_device=cuda_index(spec.config.device))
    renderer = Renderer(denoiser_loader(spec, meter, notice), OutputDir(spec.config.out_dir))
    result = CacheRender(stats=renderer.stats, memory={})
    try:
        for job in jobs:
            try:
                renderer.run(job)
            except JobError as err:
                result.errors.append((job.entry, str(err)))
                on_error(job.entry, str(err))
            on_images(job.count)
        result.memory = meter.summary()
    finally:
        meter.close()
    return result


@dataclass
class ServeResult:
    stats: dict
    memory: dict


def job_reply(renderer: Renderer, spec: DenoiserSpec, job: p.Job) -> p.Done | p.Error:
    """Render one wire job; a per-job failure becomes an ERROR, so the encoder can retry it elsewhere."""
    started = time.perf_counter()
    try:
        written = renderer.run(make_job(job.entry, job.record, spec.config, spec.identity, job.loras))
    except JobError as err:
        return p.Error(work_id=job.work_id, attempt=job.attempt, reason=p.reason_text(str(err)))
    except OSError as err:
        # This denoiser's disk (full, read-only...), not the job: it stays pending for another denoiser.
        where = f" writing {err.filename}" if err.filename else ""
        return p.Error(work_id=job.work_id, attempt=job.attempt, scope="denoiser",
                       reason=p.reason_text(f"{err.strerror or err}{where}; the job stays pending for another "
                                            "denoiser or a re-run"))
    return p.Done(work_id=job.work_id, attempt=job.attempt, seconds=time.perf_counter() - started,
                  images=tuple(p.ImageDone(file=w.path.name, sha256=w.sha256) for w in written))


def serve(spec: ServeSpec, stop: threading.Event, notice: Notice,
          on_ready: Callable[[], None] = lambda: None) -> ServeResult:
    """Take jobs from a live encoder until it says BYE (or forever with serve=True) or `stop` is set."""
    from sdxl_split.denoiser_service.worker import Worker, WorkerConfig

    config = spec.denoiser.config
    use_threads(spec.denoiser.threads)
    meter = MemoryMeter(cuda_device=cuda_index(config.device))
    # The renderer loads the UNet on first use; load() below is that first use, run on the render thread.
    renderer = Renderer(denoiser_loader(spec.denoiser, meter, notice), OutputDir(config.out_dir))

    def load() -> Callable[[p.Job], p.Done | p.Error]:
        use_threads(spec.denoiser.threads)  # this is the render thread, where every job runs
        renderer.denoiser  # readiness means the model is loaded, not merely that we connected  # noqa: B018
        on_ready()
        notice(f"denoiser ready; taking jobs from {spec.endpoint}")
        return lambda job: job_reply(renderer, spec.denoiser, job)

    worker_config = WorkerConfig(
        endpoint=spec.endpoint, credits=spec.credits, serve=spec.serve, curve_dir=spec.curve_dir,
        device=config.device, out_dir=str(config.out_dir.resolve()), job_delay_s=spec.job_delay_s,
        hang_on_job=spec.hang_on_job,
        settings_id=settings_id(config.pixel_settings(), spec.denoiser.identity.fingerprint))
    try:
        stats = Worker(worker_config, report=notice).run(load, stop)
        memory = meter.summary()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"denoiser failed: {type(err).__name__}: {err}") from None
    finally:
        meter.close()
    render_stats = renderer.stats
    return ServeResult(stats={**vars(stats), **vars(render_stats), "seconds_per_image": render_stats.seconds_per_image},
                       memory=memory)


def child_main(hooks, spec_json: str) -> None:
    """`run`'s denoiser process (shared.processes.child_process): readiness is "model loaded", the result its
    stats."""
    from sdxl_split.shared import specs
    from sdxl_split.shared.processes import install_stop_handlers, stderr_notice
    from sdxl_split.shared.wakeup import StopFlag

    spec = specs.loads(ServeSpec, spec_json)
    stop = StopFlag()
    install_stop_handlers(stop)
    result = serve(spec, stop, notice=stderr_notice, on_ready=hooks.ready)
    hooks.result({"stats": result.stats, "memory": result.memory})
