"""The option groups `encode`, `render`, `run` and `bench` share, and the encoding config built from them; the
denoiser's own options are in render_options."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import click

from sdxl_split.cli.common import DTYPE_CHOICES, default_dtype
from sdxl_split.shared.encoding_settings import MAX_CLIP_SKIP
from sdxl_split.shared.prompts import SYNTAXES
from sdxl_split.shared.settings import GlobalOptions

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5577"


def apply_options(func, options: list):
    """Decorate `func` with click options so --help lists them in the order given."""
    for option in reversed(options):
        func = option(func)
    return func


@dataclass(frozen=True)
class Encoding:
    """What encoding_options chose: everything that, with the model, decides the embeddings."""

    negative_prompt: str | None
    clip_skip: int | None
    encoder_dtype: str | None
    encoder_device: str
    prompt_syntax: str
    loras: tuple[str, ...] = ()
    lora_dir: Path | None = None
    embeddings: tuple[Path, ...] = ()
    embedding_dir: Path | None = None

    @classmethod
    def pop_from(cls, kw: dict) -> Encoding:
        """Take encoding_options' values out of a command's keyword arguments."""
        return cls(**{name: kw.pop(name) for name in ("negative_prompt", "clip_skip", "encoder_dtype",
                                                      "encoder_device", "prompt_syntax", "loras", "lora_dir",
                                                      "embeddings", "embedding_dir")})

    def extras(self):
        from sdxl_split.shared.loras import parse_flag
        from sdxl_split.shared.prompt_extras import ExtrasSpec

        return ExtrasSpec(run_loras=tuple(parse_flag(text) for text in self.loras), lora_dir=self.lora_dir,
                          inversion_files=tuple(self.embeddings), inversion_dir=self.embedding_dir)

    @property
    def dtype(self) -> str:
        return default_dtype(self.encoder_device, self.encoder_dtype)

    def settings(self, source, cache_dir: Path):
        from sdxl_split.shared.encoding_settings import encoding_settings

        return encoding_settings(source, cache_dir, self.dtype, self.clip_skip, self.prompt_syntax)


def encoding_options(func):
    """Options that change the embeddings; `render --prompts` takes the same ones to find them."""
    return _encoding_options(func, "plain", "every line that has none",
                             " A JSONL `syntax` field overrides it per line;")


def request_encoding_options(func):
    """serve's: the same options, where prompts come in requests, which A1111's clients write in A1111's syntax."""
    return _encoding_options(func, "a1111", "every request that sends none", "")


def _encoding_options(func, syntax: str, negative_for: str, per_line: str):
    return apply_options(func, [
        click.option("--negative-prompt", default=None, help=f"Negative prompt for {negative_for}."),
        click.option("--prompt-syntax", type=click.Choice(SYNTAXES), default=syntax, show_default=True,
                     help="How prompts are read: plain (as diffusers: 77 tokens, no weights), a1111 (A1111's "
                          "(word:1.3), [word], BREAK, chunks past 77 tokens), comfy (the same syntax with "
                          "ComfyUI's weighting), compel (compel's word++, .and(), .blend(); needs the compel "
                          f"extra).{per_line} `sdxl-split prompt explain` shows how a prompt compiles."),
        click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
                     help="A LoRA for every prompt (repeatable): a .safetensors path, or a name under --lora-dir; "
                          "scale 1.0 unless given. Prompts add their own with <lora:NAME:SCALE> or a JSONL `loras` "
                          "list. The encoder applies the text-encoder half, the denoiser the UNet half."),
        click.option("--lora-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     envvar="SDXL_SPLIT_LORA_DIR",
                     help="Where LoRA names are looked up [env SDXL_SPLIT_LORA_DIR]; give both sides the same "
                          "files."),
        click.option("--embedding", "embeddings", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="An SDXL textual inversion (clip_l + clip_g tensors); its token is the file's stem. "
                          "Repeatable; the encoder alone needs it."),
        click.option("--embedding-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Every .safetensors textual inversion in this folder."),
        click.option("--clip-skip", type=click.IntRange(0, MAX_CLIP_SKIP), default=None,
                     help="Skip this many final CLIP layers (as diffusers' clip_skip)."),
        click.option("--encoder-dtype", "encoder_dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="dtype of the cached embeddings [default: fp32 on cpu, else fp16]."),
        click.option("--encoder-device", "encoder_device", default="cpu", show_default=True,
                     help="Device the text encoders run on."),
    ])


def link_options(func):
    """Where the encoder listens for denoisers, and how it treats them."""
    return apply_options(func, [
        click.option("--bind", default=DEFAULT_ENDPOINT, show_default=True, envvar="SDXL_SPLIT_BIND",
                     help="ZeroMQ endpoint denoisers connect to (tcp://HOST:PORT or ipc://PATH)."),
        click.option("--wait", "wait_s", type=click.FloatRange(0), default=10.0, show_default=True,
                     envvar="SDXL_SPLIT_WAIT",
                     help="Seconds to wait for a denoiser once the cache is filled; with none, exit 0 and print "
                          "how to render later."),
        click.option("--curve", "curve_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Encrypt and authenticate with CurveZMQ: the encoder/ folder from `keys init`."),
        max_attempts_option(),
        job_timeout_option(),
    ])


def faults_option():
    """Faults for tests to inject (shared.faults), hidden from --help."""
    return click.option("--fault", "faults", multiple=True, hidden=True, metavar="NAME=VALUE",
                        callback=lambda ctx, param, values: _faults(values))


def _faults(values: tuple[str, ...]):
    from sdxl_split.shared.faults import parse_faults

    try:
        return parse_faults(values)
    except Exception as err:
        raise click.BadParameter(str(err)) from None


def max_attempts_option():
    return click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True,
                        help="A job that fails (or kills its denoiser) this many times is dead-lettered.")


def threads_option():
    return click.option("--threads", type=click.IntRange(1, 1024), default=None,
                        help="CPU threads for torch in this process [default: one per core]; lower it when "
                             "another process shares the CPU (`run` splits the cores by itself).")


def job_timeout_option():
    return click.option("--job-timeout", type=click.FloatRange(min=1), default=None,
                        help="Seconds a denoiser may hold jobs without finishing one before they go to another "
                             "denoiser and it is dropped (a hung render) [default: 10x that denoiser's slowest job, "
                             "at least 120 s; 1800 s for its first, which may compile].")


def credits_option():
    return click.option("--credits", type=click.IntRange(1, 64), default=2, show_default=True,
                        help="Jobs a denoiser holds at once; 2 keeps the next job's embeddings local while one "
                             "renders.")


@dataclass(frozen=True)
class PromptInput:
    """Where a command's prompts come from: a prompt file (`-` reads it from stdin), or --prompt texts."""

    path: Path | None
    texts: tuple[str, ...] = ()

    def words(self, file_flag: str | None = None) -> list[str]:
        """The arguments that give another command the same prompts (`file_flag`: render's --prompts)."""
        if self.texts:
            return [word for text in self.texts for word in ("--prompt", text)]
        return [*([file_flag] if file_flag else []), str(self.path)]


def prompt_text_option():
    return click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT",
                        help="A prompt to use instead of a file (repeatable).")


def command_for(opts: GlobalOptions, verb: list[str], prompts: PromptInput, encoding: Encoding,
                file_flag: str | None = None) -> str:
    """A copy-pasteable command with the same model, prompts and the encoding options that select the cache
    keys."""
    words = ["sdxl-split", "--model", opts.model, *verb, *prompts.words(file_flag)]
    if encoding.negative_prompt is not None:
        words += ["--negative-prompt", encoding.negative_prompt]
    if encoding.clip_skip:
        words += ["--clip-skip", str(encoding.clip_skip)]
    if encoding.dtype != "fp32":
        words += ["--encoder-dtype", encoding.dtype]
    if encoding.prompt_syntax != "plain":
        words += ["--prompt-syntax", encoding.prompt_syntax]
    for lora in encoding.loras:
        words += ["--lora", lora]
    for flag, value in (("--lora-dir", encoding.lora_dir), ("--embedding-dir", encoding.embedding_dir)):
        if value is not None:
            words += [flag, str(value)]
    for embedding in encoding.embeddings:
        words += ["--embedding", str(embedding)]
    return shlex.join(words)
