"""`sdxl-split render`: UNet + VAE only; renders cached embeddings (--prompts) or a live encoder's stream."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from sdxl_split.cli.common import check_endpoint, notice, print_json, read_prompts, resolve
from sdxl_split.cli.options import (
    DEFAULT_ENDPOINT,
    Encoding,
    PromptInput,
    command_for,
    credits_option,
    encoding_options,
    faults_option,
    prompt_text_option,
    threads_option,
)
from sdxl_split.cli.render_options import lora_serving_options, render_config_from, render_options
from sdxl_split.shared.errors import EXIT_SOME_FAILED
from sdxl_split.shared.memory import format_memory_line
from sdxl_split.shared.settings import GlobalOptions
from sdxl_split.shared.text import plural

MAX_LISTED = 10


@click.command("render")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="Render every prompt of this file (`-`: stdin) from the embedding cache; no encoder needed.")
@prompt_text_option()
@click.option("--connect", default=None, envvar="SDXL_SPLIT_CONNECT",
              help=f"Encoder endpoint to take jobs from [default without --prompts: {DEFAULT_ENDPOINT}].")
@credits_option()
@click.option("--serve", is_flag=True, help="Keep serving encode runs one after another.")
@click.option("--curve", "curve_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CurveZMQ keys of this GPU box: its denoisers/NAME/ folder from `keys init`.")
@faults_option()
@threads_option()
@encoding_options
@lora_serving_options
@render_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary instead.")
@click.pass_context
def render(ctx: click.Context, prompts: Path | None, prompt_texts: tuple[str, ...], connect: str | None,
           credits: int, serve: bool, curve_dir: Path | None, faults, threads: int | None, as_json: bool,
           **kw) -> None:
    """Render images with the UNet and a VAE only; no text encoder is ever loaded.

    Without --prompts, connects to an encoder (`sdxl-split encode`, default endpoint
    tcp://127.0.0.1:5577) and renders its jobs as they arrive; either side may start first.

    With --prompts FILE (or --prompt TEXT), renders each prompt's cached embeddings (run `encode`
    with the same prompts first). The encoding options (--negative-prompt, --clip-skip,
    --encoder-*) only serve to find them, and must match those `encode` used; without --prompts
    they are ignored.

    File names derive from a hash of the embeddings, seed, size, steps, guidance and scheduler,
    so re-running renders only what is missing and no image is written twice.
    """
    opts: GlobalOptions = ctx.obj
    encoding = Encoding.pop_from(kw)
    config = render_config_from(kw)
    common = {"threads": threads, "metadata": kw["metadata"], "lora_cache": kw["lora_cache"],
              "fuse_lora": kw["fuse_lora"], "faults": faults}
    if prompts is None and not prompt_texts:
        serve_stream(opts, denoiser_spec(opts, config, encoding, **common), connect, credits, serve, curve_dir,
                     as_json)
        return
    if ctx.get_parameter_source("connect") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--prompts renders from the cache and --connect from an encoder; pick one")
    render_cached(opts, PromptInput(prompts, prompt_texts), encoding, config, common, as_json)


def render_cached(opts: GlobalOptions, prompts: PromptInput, encoding: Encoding, config, common: dict,
                  as_json: bool) -> None:
    """render --prompts: every prompt's cached embeddings, no encoder."""
    from sdxl_split.denoiser_service.service import find_cached, render_batches
    from sdxl_split.shared.embedding_cache import EmbeddingCache

    prompt_file = read_prompts(opts, prompts, encoding, config.seed)
    check_seeds(prompt_file.path, prompt_file.entries, config)
    spec = denoiser_spec(opts, config, encoding, **common, entries=prompt_file.entries)
    settings = encoding.settings(spec.source, opts.cache_dir)
    batches, missing = find_cached(spec, prompt_file.entries, settings, EmbeddingCache(opts.embeddings_dir))
    for entry, problem in missing[:MAX_LISTED]:
        notice(f"missing embeddings for {prompt_file.path}:{entry.line} {entry.prompt[:60]!r}"
               + (f" ({problem})" if problem else ""))
    if len(missing) > MAX_LISTED:
        notice(f"... and {len(missing) - MAX_LISTED} more")
    if missing:
        encode = command_for(opts, ["encode"], prompts, encoding)
        notice(f"{len(missing)} of {plural(len(prompt_file.entries), 'prompt')} are not in the cache; encode them "
               f"with: {encode}")
    with tqdm(total=sum(batch.count for batch in batches), unit="img", desc="render",
              disable=True if as_json else None, leave=False) as bar:
        result = render_batches(
            spec, batches, notice=lambda m: tqdm.write(m, file=sys.stderr), on_images=bar.update,
            on_error=lambda entry, why: tqdm.write(f"error: {prompt_file.path}:{entry.line}: {why}", file=sys.stderr))
    stats = result.stats
    if as_json:
        print_json({"stats": {**vars(stats), "seconds_per_image": stats.seconds_per_image, "missing": len(missing)},
                    "memory": result.memory, "config": config.as_dict(), "model": spec.source.description})
    else:
        click.echo(f"{plural(stats.images, 'image')} rendered, {stats.existing} already there, "
                   f"{plural(stats.failed_jobs, 'job')} failed, {plural(len(missing), 'prompt')} missing -> "
                   f"{config.out_dir}")
        click.echo(timing_line(stats))
        click.echo(f"denoiser memory: {format_memory_line(result.memory)}")
    if missing or stats.failed_jobs:
        sys.exit(EXIT_SOME_FAILED)


def timing_line(stats) -> str:
    """The model's load and the renders, apart."""
    if not stats.images:
        return f"model load {stats.load_seconds:.1f} s; nothing rendered" if stats.load_seconds else "no model loaded"
    return f"model load {stats.load_seconds:.1f} s; {stats.seconds_per_image:.2f} s/image after it"


def check_seeds(path: Path, entries, config) -> None:
    """A line's own seed with this run's image count must stay in range (image i uses seed+i)."""
    from sdxl_split.shared.errors import UserError
    from sdxl_split.shared.prompts import seed_range_problem

    for entry in entries:
        if entry.seed is not None and (problem := seed_range_problem(entry.seed,
                                                                     entry.count or config.images_per_prompt)):
            raise UserError(f"{path}:{entry.line}: {problem}")


def denoiser_spec(opts: GlobalOptions, config, encoding: Encoding, source=None, threads: int | None = None,
                  metadata: str = "a1111", lora_cache: int = 8, fuse_lora: bool = False, faults=None, entries=()):
    """What a denoiser renders with: the resolved model (resolved here unless given), named as --model says, and
    the LoRA files this process resolved for `entries` and --lora, handed over so it renders those very files."""
    from sdxl_split.denoiser_service.spec import DenoiserSpec, model_identity
    from sdxl_split.shared.faults import Faults

    source = source or resolve(opts)
    identity = model_identity(source, opts.cache_dir, full_metadata=metadata == "full")
    return DenoiserSpec(source=source, identity=identity, config=config, cache_dir=opts.cache_dir, threads=threads,
                        extras=encoding.extras(), lora_cache=lora_cache, fuse_lora=fuse_lora,
                        lora_files=encoding.extras().resolver(opts.cache_dir).unet_files(entries),
                        faults=faults or Faults())


def serve_stream(opts: GlobalOptions, spec, connect: str | None, credits: int, serve: bool, curve_dir: Path | None,
                 as_json: bool) -> None:
    """Take jobs from a live encoder until it says BYE (or forever with --serve)."""
    from sdxl_split.denoiser_service.renderer import RenderStats
    from sdxl_split.denoiser_service.service import serve as serve_jobs
    from sdxl_split.denoiser_service.spec import ServeSpec
    from sdxl_split.shared.processes import install_stop_handlers
    from sdxl_split.shared.wakeup import StopFlag

    endpoint = check_endpoint(connect or DEFAULT_ENDPOINT, "--connect")
    stop = StopFlag()
    install_stop_handlers(stop)
    served = ServeSpec(denoiser=spec, endpoint=endpoint, credits=credits, serve=serve, curve_dir=curve_dir)
    result = serve_jobs(served, stop, notice=lambda m: tqdm.write(m, file=sys.stderr))
    if as_json:
        print_json({"stats": result.stats, "memory": result.memory, "config": spec.config.as_dict(),
                    "model": spec.source.description})
    else:
        stats = result.stats
        click.echo(f"{plural(stats['jobs_done'], 'job')} done, {stats['jobs_failed']} failed, "
                   f"{plural(stats['images'], 'image')} written -> {spec.config.out_dir}")
        click.echo(timing_line(RenderStats(**{k: stats[k] for k in ("images", "load_seconds", "render_seconds")})))
        click.echo(f"denoiser memory: {format_memory_line(result.memory)}")
