"""The denoiser as a service, the counterpart of encoder_service/service.py: render a prompt file's cached
embeddings, or serve a live encoder's jobs, from one frozen spec. Notices and progress go to callbacks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sdxl_split.denoiser_service.job_control import JobControl
from sdxl_split.denoiser_service.naming import ImageBatch, image_batch
from sdxl_split.denoiser_service.outputs import OutputDir
from sdxl_split.denoiser_service.renderer import Renderer, RenderStats
from sdxl_split.denoiser_service.spec import DenoiserSpec, ServeSpec
from sdxl_split.shared import protocol as p
from sdxl_split.shared.devices import cuda_index
from sdxl_split.shared.embedding_cache import Bad, EmbeddingCache, Hit
from sdxl_split.shared.encoding_settings import EncodingSettings, entry_key
from sdxl_split.shared.errors import JobError, NotOnThisDenoiser, UserError
from sdxl_split.shared.image_settings import batch_problem
from sdxl_split.shared.jobs import settings_id
from sdxl_split.shared.loras import LoraFinder
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.threads import use_threads

Notice = Callable[[str], None]
Reply = p.Done | p.Error


def denoiser_loader(spec: DenoiserSpec, meter: MemoryMeter, notice: Notice) -> Callable:
    """Loads on first call; diffusers is imported only then, so a run whose images all exist never pays."""
    config = spec.config

    def load():
        from sdxl_split.denoiser_service.pipeline import build_denoiser

        notice(f"loading UNet + {config.vae} VAE of {spec.source.description} on {config.device} ({config.dtype}, "
               f"attention {config.attention}, offload {config.offload}"
               f"{'' if config.quantize == 'none' else ', quantize ' + config.quantize})")
        if config.compile or config.compile_vae:
            notice("--compile: the first image compiles (slow; minutes with max-autotune); a new size or batch "
                   "recompiles")
        finder = LoraFinder(spec.extras.lora_dir, spec.cache_dir)
        for path in spec.lora_files:
            finder.register(path)
        fuse = ()
        if spec.fuse_lora:
            found = [(finder.find(name), scale) for name, scale in spec.extras.run_loras]
            fuse = tuple(lora.use(scale) for lora, scale in found if lora.unet)
        return build_denoiser(spec.source, config, meter, finder, spec.lora_cache, fuse)

    return load


# ---- the one seam where test faults (shared.faults) enter a denoiser: its model load, output folder and render


def renderer_for(spec: DenoiserSpec, meter: MemoryMeter, notice: Notice) -> Renderer:
    """A renderer writing into --out; the model loads on its first render."""
    return Renderer(spec.faults.wrap_load(denoiser_loader(spec, meter, notice)),
                    spec.faults.wrap_output(OutputDir(spec.config.out_dir)))


def reply_function(renderer: Renderer, spec: DenoiserSpec) -> Callable[[p.Job, JobControl | None], Reply]:
    """Render one wire job into its DONE or ERROR."""
    return spec.faults.wrap_render(lambda job, control=None: job_reply(renderer, spec, job, control))


def job_reply(renderer: Renderer, spec: DenoiserSpec, job: p.Job, control: JobControl | None = None) -> Reply:
    """Render one wire job, with the settings it chose over this denoiser's own; a per-job failure becomes an
    ERROR, so the encoder can retry it elsewhere. A job that asked for its images gets them in the DONE."""
    started = time.perf_counter()
    control = control or JobControl(job)
    config = job.options.settings.over(spec.config)
    try:
        batch = image_batch(job.entry, job.record, config, spec.identity, job.loras)
        if problem := batch_problem(config.width, config.height, batch.count):
            raise JobError(problem)
        on_step = _step_reporter(control, renderer, spec) if control.reports else None
        written = renderer.run(batch, on_step)
    except NotOnThisDenoiser as err:
        return p.Error(job_id=job.job_id, attempt=job.attempt, reason=p.reason_text(str(err)), scope="denoiser")
    except JobError as err:
        return p.Error(job_id=job.job_id, attempt=job.attempt, reason=p.reason_text(str(err)))
    except OSError as err:
        # This denoiser's disk (full, read-only...), not the job: it stays pending for another denoiser.
        where = f" writing {err.filename}" if err.filename else ""
        return p.Error(job_id=job.job_id, attempt=job.attempt, scope="denoiser",
                       reason=p.reason_text(f"{err.strerror or err}{where}; the job stays pending for another "
                                            "denoiser or a re-run"))
    return p.Done(job_id=job.job_id, attempt=job.attempt, seconds=time.perf_counter() - started,
                  images=tuple(p.ImageDone(file=w.path.name, sha256=w.sha256) for w in written),
                  image_bytes=tuple(w.data for w in written) if job.options.return_images else ())


def _step_reporter(control: JobControl, renderer: Renderer, spec: DenoiserSpec):
    """After each step: stop if the job was cancelled, else report the step, with a preview when one is due."""
    def on_step(step: int, steps: int, latents) -> None:
        due = control.preview_due(step, steps) and not control.cancelled.is_set()  # a stopping job needs none
        control.step(step, steps, previews_for(renderer, spec).png(latents) if due else b"")

    return on_step


def previews_for(renderer: Renderer, spec: DenoiserSpec):
    """The renderer's preview decoder, made on the first preview (it may load the tiny VAE)."""
    from sdxl_split.denoiser_service.previews import Previews

    if renderer.previews is None:
        renderer.previews = Previews(renderer.denoiser.pipe.vae, lambda: _tiny_vae(spec, renderer.denoiser))
    return renderer.previews


def _tiny_vae(spec: DenoiserSpec, denoiser):
    """The tiny VAE for previews, on the denoiser's device; None when it cannot be had (offline, say)."""
    from sdxl_split.denoiser_service.pipeline import load_tiny_vae, tiny_vae_location
    from sdxl_split.shared.embeddings import DTYPES

    try:
        vae = load_tiny_vae(tiny_vae_location(spec.source, spec.config), DTYPES[spec.config.dtype])
    except UserError:
        return None
    return vae.to(denoiser.pipe.unet.device)


# ---- rendering a prompt file's cached embeddings (render --prompts)


@dataclass
class CacheRender:
    """What rendering a prompt file's cached jobs did."""

    stats: RenderStats
    memory: dict


def find_cached(spec: DenoiserSpec, entries: tuple[PromptEntry, ...], settings: EncodingSettings,
                cache: EmbeddingCache) -> tuple[list[ImageBatch], list[tuple[PromptEntry, str | None]]]:
    """The batches whose embeddings are cached, and the entries with no valid cache file (and why, if it is bad)."""
    batches: list[ImageBatch] = []
    missing: list[tuple[PromptEntry, str | None]] = []
    resolver = spec.extras.resolver(spec.cache_dir)
    for entry in entries:
        extras = resolver.resolve(entry)
        found = cache.lookup(entry_key(entry, settings, extras))
        if isinstance(found, Hit):
            batches.append(image_batch(entry, found.record, spec.config, spec.identity, extras.unet_loras))
        else:
            missing.append((entry, found.problem if isinstance(found, Bad) else None))
    return batches, missing


def render_batches(spec: DenoiserSpec, batches: list[ImageBatch], notice: Notice,
                   on_images: Callable[[int], None] = lambda n: None,
                   on_error: Callable[[PromptEntry, str], None] = lambda entry, reason: None) -> CacheRender:
    """Render each batch (or find its images already there); one that fails is reported and the rest go on."""
    use_threads(spec.threads)
    meter = MemoryMeter(cuda_device=cuda_index(spec.config.device))
    renderer = renderer_for(spec, meter, notice)
    try:
        for batch in batches:
            try:
                renderer.run(batch)
            except JobError as err:
                on_error(batch.entry, str(err))
            on_images(batch.count)
        return CacheRender(stats=renderer.stats, memory=meter.summary())
    finally:
        meter.close()


# ---- serving a live encoder (render, run's denoisers)


@dataclass
class ServeResult:
    stats: dict
    memory: dict


def serve(spec: ServeSpec, stop: threading.Event, notice: Notice,
          on_ready: Callable[[], None] = lambda: None) -> ServeResult:
    """Take jobs from a live encoder until it says BYE (or forever with serve=True) or `stop` is set."""
    from sdxl_split.denoiser_service.denoiser_loop import DenoiserLoop, DenoiserLoopConfig

    config = spec.denoiser.config
    use_threads(spec.denoiser.threads)
    meter = MemoryMeter(cuda_device=cuda_index(config.device))
    # The renderer loads the UNet on first use; load() below is that first use, run on the render thread.
    renderer = renderer_for(spec.denoiser, meter, notice)

    def load() -> Callable[[p.Job], Reply]:
        use_threads(spec.denoiser.threads)  # this is the render thread, where every job runs
        renderer.denoiser  # readiness means the model is loaded, not merely that we connected  # noqa: B018
        on_ready()
        notice(f"denoiser ready (model loaded); its jobs come from {spec.endpoint}")
        return reply_function(renderer, spec.denoiser)

    loop_config = DenoiserLoopConfig(
        endpoint=spec.endpoint, credits=spec.credits, serve=spec.serve, curve_dir=spec.curve_dir,
        device=config.device, out_dir=str(config.out_dir.resolve()),
        settings_id=settings_id(config.pixel_settings(), spec.denoiser.identity.fingerprint))
    try:
        stats = DenoiserLoop(loop_config, report=notice).run(load, stop)
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
    install_stop_handlers(stop, announce=False)  # `run` says it, once
    result = serve(spec, stop, notice=stderr_notice, on_ready=hooks.ready)
    hooks.result({"stats": result.stats, "memory": result.memory})
