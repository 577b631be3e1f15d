"""`sdxl-split encode`: prompts file -> cached embeddings (and, with a denoiser attached, images)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sdxl_split.cli.common import check_bind, check_device, print_json, read_prompts, resolve
from sdxl_split.cli.options import (
    Encoding,
    PromptInput,
    command_for,
    encoding_options,
    faults_option,
    link_options,
    prompt_text_option,
    threads_option,
)
from sdxl_split.shared.errors import EXIT_SOME_FAILED
from sdxl_split.shared.settings import GlobalOptions
from sdxl_split.shared.text import plural


@click.command("encode")
@click.argument("prompts", type=click.Path(path_type=Path), required=False)
@prompt_text_option()
@encoding_options
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Prompts per forward pass. 1 is bit-identical to diffusers; more is faster.")
@threads_option()
@link_options
@faults_option()
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary instead.")
@click.pass_obj
def encode(opts: GlobalOptions, prompts: Path | None, prompt_texts: tuple[str, ...], batch_size: int,
           threads: int | None, bind: str, wait_s: float,
           curve_dir: Path | None, max_attempts: int, job_timeout: float | None, faults, as_json: bool,
           **kw) -> None:
    """Encode every prompt of PROMPTS into the embedding cache and stream them to denoisers.

    PROMPTS is plain text (one prompt per line; blank and # lines skipped) or JSONL with the fields
    prompt, prompt_2, negative_prompt, negative_prompt_2, seed, count, id, syntax, loras; `-` reads
    it from stdin, and --prompt TEXT (repeatable) gives prompts without a file. The whole file is
    checked before anything is encoded. Only the tokenizers and text encoders are loaded, and only
    if some prompt is not cached yet.

    Each embedding is queued for the denoisers (`sdxl-split render`) connected to --bind the moment
    it exists. Re-running the same command skips images already rendered and finishes the rest.
    Exit codes: 0 all done (or no denoiser came: the cache is filled), 2 bad input, 3 some jobs
    failed or were left unrendered.
    """
    from sdxl_split.encoder_service.outcome import some_failed
    from sdxl_split.encoder_service.progress import EncodeProgress
    from sdxl_split.encoder_service.service import run_encoder
    from sdxl_split.shared.processes import install_stop_handlers
    from sdxl_split.shared.wakeup import StopFlag

    encoding = Encoding.pop_from(kw)
    prompts = PromptInput(prompts, prompt_texts)
    spec = encode_spec(opts, prompts, encoding, batch_size, bind, wait_s, curve_dir, max_attempts, faults,
                       threads, job_timeout)
    stop = StopFlag()
    install_stop_handlers(stop)
    with EncodeProgress(len(spec.entries), disable=as_json) as progress:
        summary = run_encoder(spec, stop, notice=progress.notice, on_progress=progress.encoded,
                              on_event=progress.event)
    if as_json:
        print_json(summary)
    else:
        print_summary(summary, spec, command_for(opts, ["render"], prompts, encoding, file_flag="--prompts"))
    if some_failed(summary):
        sys.exit(EXIT_SOME_FAILED)


def encode_spec(opts: GlobalOptions, prompts: PromptInput, encoding: Encoding, batch_size: int, bind: str,
                wait_s: float, curve_dir: Path | None, max_attempts: int, faults=None, threads: int | None = None,
                job_timeout: float | None = None, default_seed: int = 0):
    """Check the options and the whole prompt file, resolve the model: everything before any work starts."""
    from sdxl_split.encoder_service.config import EncodeConfig, LinkConfig
    from sdxl_split.encoder_service.spec import EncodeSpec
    from sdxl_split.shared.faults import Faults

    prompt_file = read_prompts(opts, prompts, encoding, default_seed)
    device = check_device(encoding.encoder_device, "--encoder-device")
    config = EncodeConfig(device=device, dtype=encoding.dtype, clip_skip=encoding.clip_skip, batch_size=batch_size,
                          threads=threads)
    check_bind(bind, curve_dir)
    source = resolve(opts)
    return EncodeSpec(
        prompts_path=prompt_file.path, prompts_identity=prompt_file.identity, entries=prompt_file.entries,
        skipped_lines=prompt_file.skipped_lines, source=source,
        settings=encoding.settings(source, opts.cache_dir), cache_dir=opts.cache_dir,
        config=config, link=LinkConfig(endpoint=bind, curve_dir=curve_dir, max_attempts=max_attempts,
                                       job_timeout_s=job_timeout),
        wait_s=wait_s, extras=encoding.extras(), faults=faults or Faults())


def print_summary(summary: dict, spec, render_later: str) -> None:
    from sdxl_split.shared.memory import format_memory_line

    stats = summary["stats"]
    click.echo(
        f"{plural(stats['prompts'], 'prompt')} ({stats['unique']} unique): {stats['hits']} cached, "
        f"{stats['encoded']} encoded, {plural(stats['skipped_lines'], 'line')} skipped, {stats['truncated']} "
        f"truncated, {plural(stats['bad_cache_files'], 'bad cache file')} replaced; "
        f"{stats['prompts_per_s']:.2f} prompts/s"
    )
    if summary["denoisers_attached"] or summary["already_done"]:
        click.echo(f"jobs: {summary['done']} rendered now, {summary['already_done']} already done, "
                   f"{summary['dead_lettered']} failed, {summary['abandoned']} not rendered (journal "
                   f"{summary['journal']})")
    click.echo(f"encoder memory: {format_memory_line(summary['memory'])}")
    if not summary["denoisers_attached"] and summary["abandoned"]:
        click.echo(f"no denoiser attached within {spec.wait_s:g} s; embeddings are cached in {summary['cache_dir']}")
        click.echo(f"render them later with: {render_later}")
