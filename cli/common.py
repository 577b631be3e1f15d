"""Small helpers the command modules share: model resolution with notices, device checks, output."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys

import click

from sdxl_split.shared.devices import cuda_index, local_cuda_devices
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.models.resolve import ModelSource, resolve_model
from sdxl_split.shared.quiet import quiet_libraries
from sdxl_split.shared.settings import GlobalOptions
from sdxl_split.shared.text import plural

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def notice(message: str) -> None:
    click.echo(message, err=True)


@functools.cache
def resolve(opts: GlobalOptions) -> ModelSource:
    """--model resolved once per command, however many checks ask for it."""
    quiet_libraries(opts.verbosity)
    source = resolve_model(opts.model, opts.cache_dir, opts.revision, announce=notice)
    if source.random_weights:
        notice(f"model {source.description}")
    return source


def check_device(device: str, flag: str = "--device", cuda_devices: int | None = None) -> str:
    """Refuse a device torch cannot use here, naming the flag it came from. `cuda_devices`: what torch sees, if
    already known (`run` learns it from its children); otherwise asked of torch, and only for a CUDA device."""
    if device.startswith("cuda"):
        try:
            index = cuda_index(device)
        except ValueError:
            raise UserError(f"{flag} {device!r} is not cpu, mps, cuda or cuda:N") from None
        present = local_cuda_devices() if cuda_devices is None else cuda_devices
        if not present:
            raise UserError(f"{flag} {device} asked for CUDA, but torch sees no CUDA GPU; use {flag} cpu")
        if index >= present:
            raise UserError(f"{flag} {device}: only {plural(present, 'CUDA device')} present")
    elif device not in ("cpu", "mps"):
        raise UserError(f"{flag} {device!r} is not cpu, mps, cuda or cuda:N")
    return device


_ENDPOINT = re.compile(r"^(tcp://(\*|[\w.-]+|\[[0-9a-fA-F:]+\]):\d{1,5}|ipc://.+|inproc://.+)$")


def check_endpoint(endpoint: str, flag: str) -> str:
    if not _ENDPOINT.match(endpoint):
        raise UserError(f"{flag} {endpoint!r} is not a ZeroMQ endpoint; use tcp://HOST:PORT or ipc:///PATH")
    return endpoint


def check_bind(bind: str, curve_dir) -> str:
    """An encoder's --bind: a ZeroMQ endpoint, and a warning when other hosts can reach it unencrypted."""
    from sdxl_split.shared.security import is_loopback

    check_endpoint(bind, "--bind")
    if curve_dir is None and not is_loopback(bind):
        notice(f"warning: {bind} is reachable from other hosts and --curve is off: anyone who can reach it "
               "gets your prompts and can feed back results; see `sdxl-split keys init`")
    return bind


def default_dtype(device: str, dtype: str | None) -> str:
    """fp32 on the CPU (bf16 there is many times slower), fp16 on GPUs."""
    return dtype or ("fp32" if device == "cpu" else "fp16")


def print_json(payload: dict) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def read_prompts(opts: GlobalOptions, source, encoding, default_seed: int = 0):
    """The prompts of a PromptInput (a file, stdin, or --prompt texts), checked whole (lines, LoRA names,
    inversions, prompt lengths) before anything loads; warnings shown; a seed of -1 (theirs, or `default_seed`,
    the command's --seed) drawn at random for each prompt."""
    from sdxl_split.encoder_service.prompt_limits import check_chunk_counts
    from sdxl_split.shared.prompts import STDIN, parse_prompt_file, prompts_from_texts, with_random_seeds

    negative = encoding.negative_prompt
    if source.texts and source.path is not None:
        raise UserError("give a prompt file or --prompt, not both")
    if source.texts:
        prompt_file = prompts_from_texts(source.texts, negative)
    elif source.path is None:
        raise UserError("no prompts: give a prompt file (or - to read one from stdin), or --prompt TEXT")
    elif str(source.path) == "-":
        prompt_file = parse_prompt_file(STDIN, negative, raw=sys.stdin.buffer.read())
    else:
        prompt_file = parse_prompt_file(source.path, negative)
    for warning in (*prompt_file.warnings, *weights_in_plain(prompt_file, encoding.prompt_syntax)):
        notice(f"warning: {warning}")
    encoding.extras().resolver(opts.cache_dir).check(prompt_file.path, prompt_file.entries)
    check_chunk_counts(prompt_file.path, prompt_file.entries, encoding.prompt_syntax,
                       lambda: load_tokenizer(resolve(opts)))
    return dataclasses.replace(prompt_file, entries=with_random_seeds(prompt_file.entries, default_seed))


_A1111_WEIGHT = re.compile(r"\([^()]*:\s*[+-]?[\d.]+\s*\)|\(\(|\[\[")


def weights_in_plain(prompt_file, default_syntax: str) -> list[str]:
    """One warning for plain prompts that hold A1111 weights, which plain reads as words."""
    lines = [entry.line for entry in prompt_file.entries if (entry.syntax or default_syntax) == "plain"
             and any(_A1111_WEIGHT.search(text) for text in entry.texts().values() if text)]
    if not lines:
        return []
    others = f" (and {plural(len(lines) - 1, 'other line')})" if len(lines) > 1 else ""
    return [f"{prompt_file.path}:{lines[0]}{others}: A1111 weights like (word:1.2) are read as words under "
            "--prompt-syntax plain; add --prompt-syntax a1111 to apply them"]


def load_tokenizer(source: ModelSource):
    """The model's CLIP-L tokenizer (bigG's shares its vocabulary), without loading any weights or torch."""
    from transformers import CLIPTokenizer

    try:
        if source.config_dir is not None and (source.config_dir / "tokenizer").is_dir():
            return CLIPTokenizer.from_pretrained(source.config_dir / "tokenizer")
        return CLIPTokenizer.from_pretrained(source.location, subfolder="tokenizer", revision=source.revision)
    except OSError as err:
        raise UserError(f"cannot load the tokenizer of {source.spec} ({str(err).splitlines()[0][:120]})") from None
