"""`sdxl-split prompt explain`: how a prompt is read under a --prompt-syntax, from the tokenizer alone."""

from __future__ import annotations

import click

from sdxl_split.cli.common import load_tokenizer, print_json, resolve
from sdxl_split.shared.prompts import SYNTAXES
from sdxl_split.shared.settings import GlobalOptions


@click.group("prompt")
def prompt() -> None:
    """Inspect how prompts are read."""


@prompt.command("explain")
@click.argument("text")
@click.option("--syntax", type=click.Choice(SYNTAXES), default="a1111", show_default=True,
              help="How to read TEXT, as --prompt-syntax does.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def explain(opts: GlobalOptions, text: str, syntax: str, as_json: bool) -> None:
    """Show how TEXT is read: its (text, weight) pieces, then each 77-token chunk's tokens and weights and why it
    ended (full, a comma within the last 20 tokens, BREAK, or the end), then any place where sdxl-split reads it
    differently from A1111 or ComfyUI.

    Loads only --model's tokenizer, so it answers in about a second, which helps when a weight "does nothing":

    \b
      sdxl-split --model tiny prompt explain "portrait, (freckles:1.3), [blurry] BREAK city at night"
    """
    from sdxl_split.encoder_service.prompt_explain import as_text
    from sdxl_split.encoder_service.prompt_explain import explain as report_for

    report = report_for(text, syntax, load_tokenizer(resolve(opts)))
    if as_json:
        print_json(report)
    else:
        click.echo(as_text(report))
