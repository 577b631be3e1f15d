"""`sdxl-split run`: encoder and denoiser(s) as child processes on this machine, wired over ipc://."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import click

from sdxl_split.cli.encode_cmd import CHILD_HOOKS, encoding_options
from sdxl_split.cli.render_cmd import render_config_from, render_options
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.processes import Child, describe_exit, die_with_parent, send_json, spawn_child, wait_until_ready
from sdxl_split.shared.prompts import parse_prompt_file
from sdxl_split.shared.settings import GlobalOptions

READY_TIMEOUT_S = 1800.0
DRAIN_TIMEOUT_S = 30.0
EXIT_SOME_FAILED = 3


def child_main(conn, argv: list[str]) -> None:
    """Entry of every child: die with the parent, run one CLI command, report readiness and results."""
    die_with_parent()
    sys.stdout = open(os.devnull, "w")  # the parent prints the combined summary  # noqa: SIM115
    from sdxl_split.cli.main import main

    hooks = {"ready": lambda: send_json(conn, {"ready": True}),
             "result": lambda payload: send_json(conn, {"result": payload})}
    main(argv, meta={CHILD_HOOKS: hooks})


def _option_argv(command: click.Command, values: dict) -> list[str]:
    """Turn parsed option values back into the flags a child command will parse the same way."""
    argv: list[str] = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name not in values or param.hidden:
            continue
        value = values[param.name]
        if param.is_flag:
            if value:
                argv.append(param.opts[0])
        elif value is not None:
            argv += [param.opts[0], str(value)]
    return argv


@click.command("run")
@click.argument("prompts", type=click.Path(path_type=Path))
@encoding_options
@render_options
@click.option("--denoisers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Denoiser processes to start (they share the jobs by speed).")
@click.option("--credits", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True)
@click.pass_context
def run(ctx: click.Context, prompts: Path, denoisers: int, credits: int, max_attempts: int, **kw) -> None:
    """Encode PROMPTS and render them, each side in its own process, on this machine.

    The encoder runs on --encoder-device (cpu), the denoiser(s) on --device (cuda if present).
    Embeddings stream over ipc:// as they are made, so the first image starts while later
    prompts are still being encoded. Ctrl-C finishes in-flight images, journals, and exits;
    re-running the same command renders only what is missing. At the end each process's own
    peak memory is printed side by side.
    """
    opts: GlobalOptions = ctx.obj
    parse_prompt_file(prompts, default_negative=kw["negative_prompt"])  # bad input fails here, in one line
    render_config_from(kw)
    group = ctx.parent.command
    encode_cmd, render_cmd = group.get_command(ctx.parent, "encode"), group.get_command(ctx.parent, "render")
    workdir = Path(tempfile.mkdtemp(prefix="sdxl-split-"))
    endpoint = f"ipc://{workdir}/link.ipc"
    common = ["--model", opts.model, "--cache-dir", str(opts.cache_dir)] + (
        ["--revision", opts.revision] if opts.revision else []) + ["-v"] * opts.verbosity
    encoder_argv = common + ["encode", str(prompts), "--bind", endpoint, "--wait", "30",
                             "--max-attempts", str(max_attempts), *_option_argv(encode_cmd, kw)]
    render_argv = common + ["render", "--connect", endpoint, "--credits", str(credits),
                            *_option_argv(render_cmd, kw)]
    children: list[Child] = []
    interrupted = False

    def forward(signum, frame) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        click.echo("stopping: children finish in-flight images; Ctrl-C again to abort", err=True)
        if signum == signal.SIGINT:
            return  # Ctrl-C already reached every child (one process group); a second signal would abort them
        for child in children:
            if child.process.is_alive() and child.process.pid:
                os.kill(child.process.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        for index in range(denoisers):
            children.append(spawn_child(f"denoiser-{index}", child_main, render_argv))
        # The encoder starts once the denoisers hold their models, so none misses its BYE.
        wait_until_ready(children, READY_TIMEOUT_S)
        encoder = spawn_child("encoder", child_main, encoder_argv)
        children.append(encoder)
        wait_until_ready(children, READY_TIMEOUT_S)
        encoder.process.join()
        for child in children:
            child.process.join(timeout=DRAIN_TIMEOUT_S)
            if child.process.is_alive() and child.process.pid:
                os.kill(child.process.pid, signal.SIGTERM)  # missed the BYE: drain and exit
                child.process.join(timeout=DRAIN_TIMEOUT_S)
        for child in children:
            child.poll_messages()
    finally:
        for child in children:
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    _print_side_by_side(children)
    crashed = [c for c in children if c.process.exitcode not in (0, EXIT_SOME_FAILED)]
    for child in crashed:
        click.echo(f"{child.name} {describe_exit(child.process.exitcode)}", err=True)
    if crashed:
        raise UserError(f"{len(crashed)} process(es) failed; see above")
    if encoder.process.exitcode or interrupted:
        sys.exit(EXIT_SOME_FAILED)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_side_by_side(children: list[Child]) -> None:
    rows = [("process", "pid", "peak RSS GiB", "CUDA alloc GiB", "CUDA reserved GiB", "NVML GiB", "phases (RSS GiB)")]
    for child in children:
        memory = (child.result or {}).get("memory")
        if not memory:
            rows.append((child.name, str(child.process.pid), "-", "-", "-", "-", "no report"))
            continue
        phases = " ".join(f"{p['phase']}={p['peak_rss_gib']:.2f}" for p in memory["phases"])
        rows.append((child.name, str(memory["pid"]), _gib(memory["peak_rss_gib"]), _gib(memory["cuda_allocated_gib"]),
                     _gib(memory["cuda_reserved_gib"]), _gib(memory["nvml_gib"]), phases))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    click.echo("memory per process (GiB = 1024^3 bytes; each process measured itself):")
    for row in rows:
        click.echo("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    encoder = next((c for c in children if c.name == "encoder"), None)
    if encoder and encoder.result:
        r = encoder.result
        click.echo(f"jobs: {r['done']} rendered, {r['already_done']} already done, {r['dead_lettered']} failed, "
                   f"{r['abandoned']} not rendered; journal {r['journal']}")
