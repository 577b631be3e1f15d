"""`sdxl-split prompt explain`: how a prompt compiles under a --prompt-syntax, from the tokenizer alone."""

from __future__ import annotations

import click

from sdxl_split.cli.common import print_json, resolve
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.settings import GlobalOptions


@click.group("prompt")
def prompt() -> None:
    """Inspect how prompts are read."""


@prompt.command("explain")
@click.argument("text")
@click.option("--syntax", type=click.Choice(["a1111", "comfy"]), default="a1111", show_default=True,
              help="comfy reads the same syntax as a1111 (only the weighting differs).")
@click.pass_obj
def explain(opts: GlobalOptions, text: str, syntax: str) -> None:
    """Print, as JSON, how TEXT compiles: its (text, weight) pieces, then each 77-token chunk's tokens, ids and
    weights, and why each chunk ended (full, a comma within the last 20 tokens, BREAK, or the end).

    Loads only --model's tokenizer, so it answers in a second, which helps when a weight "does nothing":

    \b
      sdxl-split --model tiny prompt explain "portrait, (freckles:1.3), [blurry] BREAK city at night"
    """
    from sdxl_split.encoder_service.prompt_chunks import explain as layout

    print_json({"syntax": syntax, **layout(text, _tokenizer(opts))})


def _tokenizer(opts: GlobalOptions):
    from transformers import CLIPTokenizer

    source = resolve(opts)
    try:
        if source.config_dir is not None and (source.config_dir / "tokenizer").is_dir():
            return CLIPTokenizer.from_pretrained(source.config_dir / "tokenizer")
        return CLIPTokenizer.from_pretrained(source.location, subfolder="tokenizer", revision=source.revision)
    except OSError as err:
        raise UserError(f"cannot load the tokenizer of {source.spec} ({str(err).splitlines()[0][:120]})") from None
