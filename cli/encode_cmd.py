"""`sdxl-split encode`: prompts file -> cached embeddings (and, with a denoiser attached, images)."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import click
import zmq
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
from sdxl_split.encoder_service.config import EncodeConfig
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.embeddings import EncodingSettings
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.memory import MemoryMeter, format_memory_line
from sdxl_split.shared.models.resolve import TEXT_COMPONENTS, fingerprint, model_index
from sdxl_split.shared.prompts import parse_prompt_file
from sdxl_split.shared.settings import GlobalOptions

# ctx.meta key under which `run` passes callbacks to a child's command: "ready" and "result".
CHILD_HOOKS = "sdxl_split.child_hooks"


def encoding_options(func):
    """Options that change the embeddings; `render --prompts` takes the same ones to find them."""
    func = click.option("--negative-prompt", default=None, help="Negative prompt for every line that has none.")(func)
    func = click.option("--clip-skip", type=click.IntRange(0, 10), default=None,
                        help="Skip this many final CLIP layers (as diffusers' clip_skip).")(func)
    func = click.option("--encoder-dtype", "encoder_dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                        help="dtype of the cached embeddings [default: fp32 on cpu, else fp16].")(func)
    func = click.option("--encoder-device", "encoder_device", default="cpu", show_default=True,
                        help="Device the text encoders run on.")(func)
    return func


def encoding_settings(opts: GlobalOptions, source, dtype: str, clip_skip: int | None) -> EncodingSettings:
    # diffusers reads hidden_states[-(clip_skip + 2)]: 0 is the same layer as no clip skip, so one key.
    clip_skip = clip_skip or None
    force_zeros = bool(model_index(source).get("force_zeros_for_empty_prompt", True))
    return EncodingSettings(
        fingerprint=fingerprint(source, TEXT_COMPONENTS, opts.cache_dir),
        clip_skip=clip_skip,
        dtype=dtype,
        force_zeros=force_zeros,
    )


DEFAULT_ENDPOINT = "tcp://127.0.0.1:5577"
EXIT_SOME_FAILED = 3


def link_options(func):
    """Where the encoder listens for denoisers, and how it treats them."""
    func = click.option("--throttle", type=float, default=0.0, hidden=True,
                        help="Test hook: seconds to serve the link after each prompt.")(func)
    func = click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True,
                        help="A job that fails (or kills its denoiser) this many times is dead-lettered.")(func)
    func = click.option("--curve", "curve_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Encrypt and authenticate with CurveZMQ: the encoder/ folder from `keys init`.")(func)
    func = click.option("--wait", "wait_s", type=click.FloatRange(0), default=10.0, show_default=True,
                        envvar="SDXL_SPLIT_WAIT",
                        help="Seconds to wait for a denoiser once the cache is filled; with none, exit 0 "
                             "and print how to render later.")(func)
    func = click.option("--bind", default=DEFAULT_ENDPOINT, show_default=True, envvar="SDXL_SPLIT_BIND",
                        help="ZeroMQ endpoint denoisers connect to (tcp://HOST:PORT or ipc://PATH).")(func)
    return func


@click.command("encode")
@click.argument("prompts", type=click.Path(path_type=Path))
@encoding_options
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Prompts per forward pass. 1 is bit-identical to diffusers; more is faster.")
@link_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary instead.")
@click.pass_context
def encode(ctx: click.Context, prompts: Path, negative_prompt: str | None, clip_skip: int | None,
           encoder_dtype: str | None, encoder_device: str, batch_size: int, bind: str, wait_s: float,
           curve_dir: Path | None, max_attempts: int, throttle: float, as_json: bool) -> None:
    """Encode every prompt of PROMPTS into the embedding cache and stream them to denoisers.

    PROMPTS is plain text (one prompt per line; blank and # lines skipped) or JSONL with the fields
    prompt, prompt_2, negative_prompt, negative_prompt_2, seed, count, id. The whole file is
    checked before anything is encoded. Only the tokenizers and text encoders are loaded, and only
    if some prompt is not cached yet.

    Each embedding is queued for the denoisers (`sdxl-split render`) connected to --bind the moment
    it exists. Re-running the same command skips images already rendered and finishes the rest.
    Exit codes: 0 all done (or no denoiser came: the cache is filled), 2 bad input, 3 some jobs
    failed or were left unrendered.
    """
    import threading

    from sdxl_split.encoder_service.dispatcher import LinkConfig
    from sdxl_split.encoder_service.journal import Journal, journal_path
    from sdxl_split.encoder_service.streaming import run_streaming_encode
    from sdxl_split.shared.processes import install_stop_handlers
    from sdxl_split.shared.security import is_loopback

    opts: GlobalOptions = ctx.obj
    prompt_file = parse_prompt_file(prompts, default_negative=negative_prompt)
    device = check_device(encoder_device, "--encoder-device")
    config = EncodeConfig(device=device, dtype=default_dtype(device, encoder_dtype), clip_skip=clip_skip,
                          batch_size=batch_size)
    check_endpoint(bind, "--bind")
    if curve_dir is None and not is_loopback(bind):
        notice(f"warning: {bind} is reachable from other hosts and --curve is off: anyone who can reach it "
               "gets your prompts and can feed back results; see `sdxl-split keys init`")
    source = resolve(opts)
    settings = encoding_settings(opts, source, config.dtype, config.clip_skip)
    cache = EmbeddingCache(opts.embeddings_dir)
    journal = Journal(journal_path(opts.cache_dir, prompts, json.dumps(asdict(settings), sort_keys=True)))
    meter = MemoryMeter(cuda_device=cuda_index(device))
    stop = threading.Event()
    install_stop_handlers(stop)
    hooks = ctx.meta.get(CHILD_HOOKS, {})

    def load():
        from sdxl_split.encoder_service.text_side import TextSide

        notice(f"loading text encoders of {source.description} on {device} ({config.dtype})")
        return TextSide(source, device, config.dtype)

    def report(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    link = LinkConfig(endpoint=bind, curve_dir=curve_dir, max_attempts=max_attempts)
    with tqdm(total=len(prompt_file.entries), unit="prompt", desc="encode", disable=True if as_json else None,
              leave=False) as bar:
        try:
            result = run_streaming_encode(
                list(prompt_file.entries), settings, cache, load, meter, link, journal, wait_s, stop, report,
                batch_size=config.batch_size, on_progress=bar.update, throttle_s=throttle,
                on_bound=hooks.get("ready", lambda: None),
            )
        except zmq.ZMQError as err:
            raise UserError(f"cannot listen on {bind} ({err.strerror}); is another encoder running? "
                            "pass --bind with another endpoint") from None
    stats = result.encode
    stats.skipped_lines = prompt_file.skipped_lines
    memory = meter.summary()
    meter.close()
    summary = {"stats": stats.as_dict(), "memory": memory, "cache_dir": str(cache.root), "journal": str(journal.path),
               "model": source.description, "jobs": result.jobs, "already_done": result.already_done,
               "done": result.done, "dead_lettered": result.dead_lettered, "abandoned": result.abandoned,
               "denoisers_attached": result.denoisers_attached, "interrupted": result.interrupted}
    hooks.get("result", lambda payload: None)(summary)
    later = command_for(opts, ["render", "--prompts"], prompts, negative_prompt, clip_skip, config.dtype)
    if as_json:
        print_json(summary)
    else:
        click.echo(
            f"{stats.prompts} prompts ({stats.unique} unique): {stats.hits} cached, {stats.encoded} encoded, "
            f"{stats.skipped_lines} lines skipped, {stats.truncated} truncated, {stats.bad_cache_files} bad "
            f"cache files replaced; {stats.prompts_per_s:.2f} prompts/s"
        )
        if result.denoisers_attached or result.already_done:
            click.echo(f"jobs: {result.done} rendered now, {result.already_done} already done, "
                       f"{result.dead_lettered} failed, {result.abandoned} not rendered (journal {journal.path})")
        click.echo(f"encoder memory: {format_memory_line(memory)}")
        if not result.denoisers_attached and result.abandoned:
            click.echo(f"no denoiser attached within {wait_s:g} s; embeddings are cached in {cache.root}")
            click.echo(f"render them later with: {later}")
    if result.dead_lettered or (result.denoisers_attached and result.abandoned) or result.interrupted:
        sys.exit(EXIT_SOME_FAILED)


def command_for(opts: GlobalOptions, verb: list[str], prompts: Path, negative_prompt: str | None,
                clip_skip: int | None, dtype: str) -> str:
    """A copy-pasteable command with the same model and the encoding options that select the cache keys."""
    words = ["sdxl-split", "--model", opts.model, *verb, str(prompts)]
    if negative_prompt is not None:
        words += ["--negative-prompt", negative_prompt]
    if clip_skip:
        words += ["--clip-skip", str(clip_skip)]
    if dtype != "fp32":
        words += ["--encoder-dtype", dtype]
    return shlex.join(words)


