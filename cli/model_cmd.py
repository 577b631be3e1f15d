"""`sdxl-split model ...`: build the offline models and show what a --model resolves to."""

from __future__ import annotations

from pathlib import Path

import click

from sdxl_split.cli.common import check_device
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.models.architectures import ARCHITECTURES, LORA_PARTS
from sdxl_split.shared.models.resolve import DENOISE_COMPONENTS, TEXT_COMPONENTS, fingerprint, resolve_model
from sdxl_split.shared.quiet import quiet_libraries
from sdxl_split.shared.settings import GlobalOptions

ASSETS = ("tiny-lora", "tiny-embedding")


@click.group()
def model() -> None:
    """Build offline SDXL-shaped models and inspect --model values."""


@model.command("init")
@click.argument("kind", type=click.Choice([*sorted(ARCHITECTURES), *ASSETS]))
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
@click.option("--device", default="cpu", show_default=True,
              help="Where to draw the random weights: cuda builds sdxl-random in seconds instead of minutes "
                   "(the same seed gives other weights on cuda than on cpu).")
@click.option("--only", type=click.Choice(LORA_PARTS), default="both", show_default=True,
              help="tiny-lora: both halves, or only the UNet's or the text encoders'.")
@click.pass_obj
def init(opts: GlobalOptions, kind: str, directory: Path, seed: int, device: str, only: str) -> None:
    """Write an SDXL-architecture diffusers folder with seeded random weights (or, for the add-on kinds, one
    .safetensors file at DIRECTORY).

    \b
    tiny            a few MB; every SDXL feature at toy sizes, for tests and offline trials (fp32)
    sdxl-random     the full SDXL base 1.0 architecture (about 5 GB, fp16) for real memory and FLOPs
    tiny-lora       a LoRA for tiny: both text encoders and the UNet (see --only)
    tiny-embedding  an SDXL textual inversion for tiny (clip_l + clip_g); its token is the file's stem

    They use the real CLIP BPE tokenizers. Images from random weights are noise. Same seed, same bytes.
    """
    quiet_libraries(opts.verbosity)
    if kind in ASSETS:
        from sdxl_split.shared.models.test_assets import tiny_embedding, tiny_lora, write_asset

        if directory.suffix != ".safetensors":
            raise UserError(f"{kind} writes one file: give a path ending in .safetensors, not {directory}")
        write_asset(directory, tiny_lora(only, seed=seed) if kind == "tiny-lora" else tiny_embedding(seed=seed))
        click.echo(f"wrote {directory} ({kind}, seed {seed}, random weights)")
        return
    from sdxl_split.shared.models.builder import build_model

    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} is not empty; pick a new directory or remove it first")
    device = check_device(device)
    arch = ARCHITECTURES[kind]
    click.echo(f"building '{kind}' (random weights, seed {seed}, {arch.weights_dtype}, drawn on {device}) into "
               f"{directory}", err=True)
    report = build_model(
        arch, directory, seed=seed, device=device,
        on_component=lambda name, n: click.echo(f"  {name:<15} {n / 1e6:>10.1f} M parameters", err=True),
    )
    total = sum(report.parameters.values())
    click.echo(
        f"wrote {report.directory}: {total / 1e6:.1f} M parameters, "
        f"{report.bytes_on_disk / 2**30:.2f} GiB on disk, in {report.seconds:.1f} s (random weights)"
    )


@model.command("info")
@click.pass_obj
def info(opts: GlobalOptions) -> None:
    """Resolve --model and print its source and the fingerprints used in cache keys."""
    quiet_libraries(opts.verbosity)
    source = resolve_model(opts.model, opts.cache_dir, opts.revision, announce=lambda m: click.echo(m, err=True))
    click.echo(f"model:        {source.description}")
    click.echo(f"kind:         {source.kind}")
    click.echo(f"location:     {source.location}")
    click.echo(f"text side:    {fingerprint(source, TEXT_COMPONENTS, opts.cache_dir)}")
    click.echo(f"denoise side: {fingerprint(source, DENOISE_COMPONENTS, opts.cache_dir)}")
