"""`sdxl-split render`: UNet + VAE only; renders cached embeddings (--prompts) or a live encoder's stream."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from sdxl_split.cli.common import (
    DTYPE_CHOICES,
    check_device,
    check_endpoint,
    cuda_index,
    default_dtype,
    notice,
    print_json,
    resolve,
)
from sdxl_split.cli.encode_cmd import (
    CHILD_HOOKS,
    DEFAULT_ENDPOINT,
    command_for,
    encoding_options,
    encoding_settings,
)
from sdxl_split.denoiser_service.config import (
    ATTENTION,
    COMPILE_MODES,
    OFFLOAD,
    SCHEDULERS,
    VAE_KINDS,
    RenderConfig,
    parse_size,
    validate,
)
from sdxl_split.denoiser_service.denoise import Denoiser, JobError
from sdxl_split.denoiser_service.outputs import OutputDir
from sdxl_split.denoiser_service.render_loop import ModelIdentity, Renderer, make_job
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.embeddings import embedding_key
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.jobs import settings_id
from sdxl_split.shared.memory import MemoryMeter, format_memory_line
from sdxl_split.shared.models.resolve import DENOISE_COMPONENTS, ModelSource, fingerprint
from sdxl_split.shared.prompts import parse_prompt_file
from sdxl_split.shared.settings import GlobalOptions

EXIT_SOME_FAILED = 3
MAX_LISTED = 10


def render_options(func):
    """The denoiser's knobs; `run` and `bench` take the same ones."""
    options = [
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("images"),
                     show_default=True, help="Output folder for PNGs and manifest.jsonl."),
        click.option("--device", default=None, help="cuda, cuda:N or cpu [default: cuda if present, else cpu]."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="UNet/VAE dtype [default: fp16 on GPU, fp32 on CPU]."),
        click.option("--attention", type=click.Choice(ATTENTION), default="sdpa", show_default=True,
                     help="sdpa = PyTorch scaled_dot_product_attention; default = the classic AttnProcessor."),
        click.option("--compile", "compile_unet", is_flag=True,
                     help="torch.compile the UNet (fullgraph). The first image compiles; a new size or batch "
                          "recompiles."),
        click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default="default", show_default=True,
                     help="torch.compile mode for --compile and --compile-vae; max-autotune searches GEMM kernels "
                          "for minutes on the first image, reduce-overhead adds CUDA graphs."),
        click.option("--compile-vae", is_flag=True, help="torch.compile the VAE decoder too."),
        click.option("--channels-last", is_flag=True,
                     help="NHWC memory layout for the UNet and VAE (faster convolutions on tensor-core GPUs)."),
        click.option("--fuse-qkv", is_flag=True,
                     help="Fuse each attention's q/k/v projections into one matmul (needs --attention sdpa)."),
        click.option("--vae", type=click.Choice(VAE_KINDS), default="full", show_default=True,
                     help="full = the model's AutoencoderKL; tiny = AutoencoderTiny (taesdxl), fast previews."),
        click.option("--vae-model", default=None,
                     help="Tiny VAE for --vae tiny [default: the model's vae_tiny/, else madebyollin/taesdxl]."),
        click.option("--vae-slicing", is_flag=True, help="Decode the batch one image at a time."),
        click.option("--vae-tiling", is_flag=True, help="Decode in overlapping tiles (see --vae-tile-size)."),
        click.option("--vae-tile-size", type=int, default=512, show_default=True, help="Tile size in pixels."),
        click.option("--offload", type=click.Choice(OFFLOAD), default="none", show_default=True,
                     help="CPU offload: model (whole models), sequential (every layer), group (every layer, the "
                          "next one uploading on a side stream while this one computes)."),
        click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True),
        click.option("--guidance", type=float, default=5.0, show_default=True, help="Classifier-free guidance scale."),
        click.option("--size", default="1024x1024", show_default=True, help="WIDTHxHEIGHT, multiples of 8."),
        click.option("--images-per-prompt", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Images per prompt (a JSONL 'count' overrides it)."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                     help="Image i of a prompt uses seed+i (a JSONL 'seed' overrides it)."),
        click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="euler", show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def render_config_from(kw: dict) -> RenderConfig:
    import torch

    device = kw["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    width, height = parse_size(kw["size"])
    config = RenderConfig(
        out_dir=kw["out_dir"], device=device, dtype=default_dtype(device, kw["dtype"]), attention=kw["attention"],
        compile=kw["compile_unet"], compile_mode=kw["compile_mode"], compile_vae=kw["compile_vae"],
        channels_last=kw["channels_last"], fuse_qkv=kw["fuse_qkv"], vae=kw["vae"], vae_model=kw["vae_model"],
        vae_slicing=kw["vae_slicing"], vae_tiling=kw["vae_tiling"], vae_tile_size=kw["vae_tile_size"],
        offload=kw["offload"], steps=kw["steps"], guidance=kw["guidance"], width=width, height=height,
        images_per_prompt=kw["images_per_prompt"], seed=kw["seed"], scheduler=kw["scheduler"],
    )
    validate(config, torch.cuda.is_available())
    if not config.device.startswith("cuda"):
        check_device(config.device)
    return config


def model_identity(opts: GlobalOptions, source: ModelSource) -> ModelIdentity:
    return ModelIdentity(name=opts.model, fingerprint=fingerprint(source, DENOISE_COMPONENTS, opts.cache_dir))


def denoiser_loader(source: ModelSource, config: RenderConfig, meter: MemoryMeter):
    def load() -> Denoiser:
        from sdxl_split.denoiser_service.pipeline import load_denoiser_pipeline

        notice(f"loading UNet + {config.vae} VAE of {source.description} on {config.device} ({config.dtype}, "
               f"attention {config.attention}, offload {config.offload})")
        if config.compile or config.compile_vae:
            notice("--compile: the first image compiles (slow; minutes with max-autotune); a new size or batch "
                   "recompiles")
        with meter.phase("load"):
            pipe = load_denoiser_pipeline(source, config)
        return Denoiser(pipe, config, meter)

    return load


@click.command("render")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="Render every prompt of this file from the embedding cache (no encoder needed).")
@click.option("--connect", default=None, envvar="SDXL_SPLIT_CONNECT",
              help=f"Encoder endpoint to take jobs from [default without --prompts: {DEFAULT_ENDPOINT}].")
@click.option("--credits", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Jobs held at once; 2 keeps the next job's embeddings local while one renders.")
@click.option("--serve", is_flag=True, help="Keep serving encode runs one after another.")
@click.option("--curve", "curve_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CurveZMQ keys of this GPU box: its denoisers/NAME/ folder from `keys init`.")
@click.option("--job-delay", type=float, default=0.0, hidden=True, help="Test hook: sleep before each job.")
@encoding_options
@render_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary instead.")
@click.pass_context
def render(ctx: click.Context, prompts: Path | None, connect: str | None, credits: int, serve: bool,
           curve_dir: Path | None, job_delay: float, negative_prompt: str | None, clip_skip: int | None,
           encoder_dtype: str | None, encoder_device: str, as_json: bool, **kw) -> None:
    """Render images with the UNet and a VAE only; no text encoder is ever loaded.

    Without --prompts, connects to an encoder (`sdxl-split encode`, default endpoint
    tcp://127.0.0.1:5577) and renders its jobs as they arrive; either side may start first.

    With --prompts FILE, renders each prompt's cached embeddings (run `encode FILE` first). The
    encoding options (--negative-prompt, --clip-skip, --encoder-*) only serve to find them, and
    must match those `encode` used; without --prompts they are ignored.

    File names derive from a hash of the embeddings, seed, size, steps, guidance and scheduler,
    so re-running renders only what is missing and no image is written twice.
    """
    opts: GlobalOptions = ctx.obj
    config = render_config_from(kw)
    if prompts is None:
        serve_stream(ctx, config, connect, credits, serve, curve_dir, job_delay, as_json)
        return
    if ctx.get_parameter_source("connect") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--prompts renders from the cache and --connect from an encoder; pick one")
    prompt_file = parse_prompt_file(prompts, default_negative=negative_prompt)
    source = resolve(opts)
    settings = encoding_settings(opts, source, default_dtype(encoder_device, encoder_dtype), clip_skip)
    cache = EmbeddingCache(opts.embeddings_dir)
    identity = model_identity(opts, source)
    jobs, missing = [], []
    for entry in prompt_file.entries:
        found = cache.lookup(embedding_key(entry.texts(), settings))
        if found.hit:
            assert found.record is not None
            jobs.append(make_job(entry, found.record, config, identity))
        else:
            missing.append((entry, found.problem))
    for entry, problem in missing[:MAX_LISTED]:
        notice(f"missing embeddings for {prompts}:{entry.line} {entry.prompt[:60]!r}"
               + (f" ({problem})" if problem else ""))
    if len(missing) > MAX_LISTED:
        notice(f"... and {len(missing) - MAX_LISTED} more")
    if missing:
        encode = command_for(opts, ["encode"], prompts, negative_prompt, clip_skip, settings.dtype)
        notice(f"{len(missing)} of {len(prompt_file.entries)} prompts are not in the cache; encode them with: {encode}")
    meter = MemoryMeter(cuda_device=cuda_index(config.device))
    renderer = Renderer(denoiser_loader(source, config, meter), OutputDir(config.out_dir))
    with tqdm(total=sum(j.count for j in jobs), unit="img", desc="render", disable=True if as_json else None,
              leave=False) as bar:
        for job in jobs:
            try:
                renderer.run(job)
            except JobError as err:
                tqdm.write(f"error: {prompts}:{job.entry.line}: {err}", file=sys.stderr)
            bar.update(job.count)
    stats = renderer.stats
    memory = meter.summary()
    meter.close()
    if as_json:
        print_json({"stats": {**vars(stats), "seconds_per_image": stats.seconds_per_image, "missing": len(missing)},
                    "memory": memory, "config": config.as_dict(), "model": source.description})
    else:
        click.echo(f"{stats.images} images rendered, {stats.existing} already there, {stats.failed_jobs} jobs failed, "
                   f"{len(missing)} prompts missing; {stats.seconds_per_image:.2f} s/image -> {config.out_dir}")
        click.echo(f"denoiser memory: {format_memory_line(memory)}")
    if missing or stats.failed_jobs:
        sys.exit(EXIT_SOME_FAILED)


def serve_stream(ctx: click.Context, config: RenderConfig, connect: str | None, credits: int, serve: bool,
                 curve_dir: Path | None, job_delay: float, as_json: bool) -> None:
    """Take jobs from a live encoder until it says BYE (or forever with --serve)."""
    import threading

    from sdxl_split.denoiser_service.worker import Worker, WorkerConfig
    from sdxl_split.shared import protocol as p
    from sdxl_split.shared.processes import install_stop_handlers

    opts: GlobalOptions = ctx.obj
    endpoint = check_endpoint(connect or DEFAULT_ENDPOINT, "--connect")
    hooks = ctx.meta.get(CHILD_HOOKS, {})
    source = resolve(opts)
    identity = model_identity(opts, source)
    meter = MemoryMeter(cuda_device=cuda_index(config.device))
    # The renderer loads the UNet on first use; load() below is that first use, run on the render thread.
    renderer = Renderer(denoiser_loader(source, config, meter), OutputDir(config.out_dir))

    def load():
        renderer.denoiser  # readiness means the model is loaded, not merely that we connected  # noqa: B018
        hooks.get("ready", lambda: None)()
        notice(f"denoiser ready; taking jobs from {endpoint}")

        def render_one(job: p.Job) -> p.Done | p.Error:
            started = time.perf_counter()
            render_job = make_job(job.entry, job.record, config, identity)
            try:
                written = renderer.run(render_job)
            except JobError as err:
                return p.Error(job_id=job.job_id, attempt=job.attempt, reason=str(err)[:2000])
            return p.Done(job_id=job.job_id, attempt=job.attempt, seconds=time.perf_counter() - started,
                          images=tuple(p.ImageDone(file=w.path.name, sha256=w.sha256) for w in written))

        return render_one

    worker_config = WorkerConfig(endpoint=endpoint, credits=credits, serve=serve, curve_dir=curve_dir,
                                 device=config.device, out_dir=str(config.out_dir.resolve()), job_delay_s=job_delay,
                                 settings_id=settings_id(config.pixel_settings(), identity.fingerprint))
    stop = threading.Event()
    install_stop_handlers(stop)
    worker = Worker(worker_config, report=lambda m: tqdm.write(m, file=sys.stderr))
    try:
        stats = worker.run(load, stop)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"denoiser failed: {type(err).__name__}: {err}") from None
    render_stats = renderer.stats
    memory = meter.summary()
    meter.close()
    summary = {"stats": {**vars(stats), **vars(render_stats), "seconds_per_image": render_stats.seconds_per_image},
               "memory": memory, "config": config.as_dict(), "model": source.description}
    hooks.get("result", lambda payload: None)(summary)
    if as_json:
        print_json(summary)
    else:
        click.echo(f"{stats.jobs_done} jobs done, {stats.jobs_failed} failed, {render_stats.images} images written -> "
                   f"{config.out_dir}")
        click.echo(f"denoiser memory: {format_memory_line(memory)}")
