"""`sdxl-split encode`: prompts file -> cached embeddings (and, with a denoiser attached, images)."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
from sdxl_split.cli.common import DTYPE_CHOICES, check_device, default_dtype, notice, print_json, resolve
from sdxl_split.encoder_service.config import EncodeConfig
from sdxl_split.encoder_service.encode_loop import run_encode
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.embeddings import EncodingSettings
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.memory import MemoryMeter, format_memory_line
from sdxl_split.shared.models.resolve import TEXT_COMPONENTS, fingerprint, model_index
from sdxl_split.shared.prompts import parse_prompt_file
from sdxl_split.shared.settings import GlobalOptions
from tqdm import tqdm


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
    force_zeros = bool(model_index(source).get("force_zeros_for_empty_prompt", True))
    return EncodingSettings(
        fingerprint=fingerprint(source, TEXT_COMPONENTS, opts.cache_dir),
        clip_skip=clip_skip,
        dtype=dtype,
        force_zeros=force_zeros,
    )


@click.command("encode")
@click.argument("prompts", type=click.Path(path_type=Path))
@encoding_options
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Prompts per forward pass. 1 is bit-identical to diffusers; more is faster.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary instead.")
@click.pass_obj
def encode(opts: GlobalOptions, prompts: Path, negative_prompt: str | None, clip_skip: int | None,
           encoder_dtype: str | None, encoder_device: str, batch_size: int, as_json: bool) -> None:
    """Encode every prompt of PROMPTS into the embedding cache.

    PROMPTS is plain text (one prompt per line; blank and # lines skipped) or JSONL with the fields
    prompt, prompt_2, negative_prompt, negative_prompt_2, seed, count, id. The whole file is
    checked before anything is encoded. Only the tokenizers and text encoders are loaded, and only
    if some prompt is not cached yet.
    """
    prompt_file = parse_prompt_file(prompts, default_negative=negative_prompt)
    device = check_device(encoder_device)
    config = EncodeConfig(device=device, dtype=default_dtype(device, encoder_dtype), clip_skip=clip_skip,
                          batch_size=batch_size)
    source = resolve(opts)
    settings = encoding_settings(opts, source, config.dtype, config.clip_skip)
    cache = EmbeddingCache(opts.embeddings_dir)
    meter = MemoryMeter(cuda_device=_cuda_index(device))

    def load():
        from sdxl_split.encoder_service.text_side import TextSide

        notice(f"loading text encoders of {source.description} on {device} ({config.dtype})")
        return TextSide(source, device, config.dtype)

    with tqdm(total=len(prompt_file.entries), unit="prompt", desc="encode", disable=None if not as_json else True,
              leave=False) as bar:
        stats = run_encode(list(prompt_file.entries), settings, cache, load, sink=lambda *a: None, meter=meter,
                           batch_size=config.batch_size, on_progress=bar.update,
                           warn=lambda m: tqdm.write(f"warning: {m}", file=click.get_text_stream("stderr")))
    stats.skipped_lines = prompt_file.skipped_lines
    memory = meter.summary()
    meter.close()
    if as_json:
        print_json({"stats": stats.as_dict(), "memory": memory, "cache_dir": str(cache.root),
                    "model": source.description})
        return
    click.echo(
        f"{stats.prompts} prompts ({stats.unique} unique): {stats.hits} cached, {stats.encoded} encoded, "
        f"{stats.skipped_lines} lines skipped, {stats.truncated} truncated, {stats.bad_cache_files} bad cache "
        f"files replaced; {stats.prompts_per_s:.2f} prompts/s"
    )
    click.echo(f"encoder memory: {format_memory_line(memory)}")
    click.echo(f"embeddings in {cache.root}")
    click.echo(f"render them later with: {render_later_command(opts, prompts, negative_prompt, clip_skip, config)}")


def render_later_command(opts: GlobalOptions, prompts: Path, negative_prompt: str | None,
                         clip_skip: int | None, config: EncodeConfig) -> str:
    words = ["sdxl-split", "--model", opts.model, "render", "--prompts", str(prompts)]
    if negative_prompt is not None:
        words += ["--negative-prompt", negative_prompt]
    if clip_skip is not None:
        words += ["--clip-skip", str(clip_skip)]
    if config.dtype != "fp32" or config.device != "cpu":
        words += ["--encoder-dtype", config.dtype]
    return shlex.join(words)


def _cuda_index(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    return int(device.split(":", 1)[1]) if ":" in device else 0


__all__ = ["encode", "encoding_options", "encoding_settings", "UserError"]
