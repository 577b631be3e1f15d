"""`sdxl-split keys ...`: create the CurveZMQ keys for running the encoder and denoisers on different hosts."""

from __future__ import annotations

from pathlib import Path

import click

from sdxl_split.shared.security import create_keys


@click.group()
def keys() -> None:
    """CurveZMQ keys: encryption plus an allow-list of GPU boxes, for links that leave this host."""


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--client",
    "clients",
    multiple=True,
    default=("denoiser",),
    show_default=True,
    help="Name of a GPU box (denoiser) to make a key pair for; repeat for several.",
)
def init(directory: Path, clients: tuple[str, ...]) -> None:
    """Write a key pair for the encoder and one per GPU box into the new folder DIRECTORY."""
    layout = create_keys(directory, list(clients))
    click.echo(f"wrote CurveZMQ keys to {layout.root}")
    click.echo(f"  encoder box: copy {layout.encoder_dir}/")
    click.echo(f"    server secret    {layout.server_secret}")
    click.echo(f"    allowed clients  {layout.allowed_clients_dir}/ ({len(layout.clients)} public keys)")
    for name, client in layout.clients.items():
        click.echo(f"  GPU box {name!r}: copy {client.directory}/")
        click.echo(f"    client secret    {client.secret}")
        click.echo(f"    server public    {client.server_public}")
    click.echo("Keep *.key_secret files private; to revoke a GPU box, delete its .key from the allowed clients.")
