"""The `sdxl-split` click group: global options, and the one place errors become one line."""

from __future__ import annotations

import os

# Library import-time chatter (e.g. "requires torchvision") would bury our one-line messages.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from importlib.metadata import version  # noqa: E402

import click  # noqa: E402

from sdxl_split.shared.errors import UserError, first_line, os_error_line  # noqa: E402
from sdxl_split.shared.models.resolve import DEFAULT_MODEL  # noqa: E402
from sdxl_split.shared.processes import exit_now  # noqa: E402
from sdxl_split.shared.settings import CACHE_ENV, GlobalOptions, cache_dir_from  # noqa: E402


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs, so errors and --help of one command do
    not pay for importing torch and diffusers through all the others."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._lazy and name not in self.commands:
            module, attribute = self._lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


# One line per command: adding a command touches nothing else.
COMMANDS = {
    "bench": "sdxl_split.cli.bench_cmd:bench",
    "cache": "sdxl_split.cli.cache_cmd:cache",
    "encode": "sdxl_split.cli.encode_cmd:encode",
    "keys": "sdxl_split.cli.keys_cmd:keys",
    "model": "sdxl_split.cli.model_cmd:model",
    "prompt": "sdxl_split.cli.prompt_cmd:prompt",
    "render": "sdxl_split.cli.render_cmd:render",
    "run": "sdxl_split.cli.run_cmd:run",
    "serve": "sdxl_split.cli.serve_cmd:serve",
}


@click.group(cls=LazyGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version("sdxl-split"), prog_name="sdxl-split")
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    envvar="SDXL_SPLIT_MODEL",
    help="SDXL model: 'tiny' (built-in, offline), 'sdxl-random' (full-size, random weights), "
    "a local diffusers folder, a .safetensors checkpoint, or a hub id.",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a hub --model.")
@click.option(
    "--cache-dir",
    envvar=CACHE_ENV,
    default=None,
    help=f"Where embeddings, built-in models and fingerprints live [env {CACHE_ENV}; "
    "default: the user cache dir].",
)
@click.option("-v", "--verbose", count=True, help="More detail; -vv also shows library logs and tracebacks.")
@click.pass_context
def cli(ctx: click.Context, model: str, revision: str | None, cache_dir: str | None, verbose: int) -> None:
    """Split-process Stable Diffusion XL.

    The encoder (tokenizers + two CLIP text encoders) and the denoiser (UNet + VAE) run as separate
    processes, linked by a safetensors embedding cache and ZeroMQ, so each one's memory can be
    measured and placed on its own device.

    \b
    Try it offline on the built-in tiny model:
      sdxl-split --model tiny run prompts.txt --out images/
    """
    ctx.obj = GlobalOptions(model=model, revision=revision, cache_dir=cache_dir_from(cache_dir),
                            verbosity=verbose)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print one line and exit non-zero, never a traceback."""
    try:
        with cli.make_context("sdxl-split", list(sys.argv[1:] if argv is None else argv)) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.UsageError as err:
        # One line, like every other error; click's own form takes three.
        hint = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:  # the same lower-case `error:` as every other line
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as err:  # an unusable --cache-dir or --out, a full disk, a permission
        click.echo(os_error_line(err), err=True)
        sys.exit(1)
    except Exception as err:  # a bug, not bad input: keep it short unless asked
        if "-vv" in (argv or sys.argv):
            traceback.print_exc()
        first = first_line(err, 300)
        click.echo(f"internal error: {type(err).__name__}: {first} (rerun with -vv for the traceback)", err=True)
        sys.exit(1)


def entry() -> None:
    """The `sdxl-split` console script and `python -m sdxl_split.cli`: main(), then out without the
    interpreter's teardown (see exit_now). main() itself returns, for callers in a longer-lived process."""
    main()
    exit_now(0)
