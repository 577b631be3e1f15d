"""`sdxl-split run`: encoder and denoiser(s) as child processes on this machine, wired over ipc://."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click

from sdxl_split.cli.common import notice
from sdxl_split.cli.encode_cmd import encode_spec
from sdxl_split.cli.options import (
    Encoding,
    PromptInput,
    credits_option,
    encoding_options,
    faults_option,
    job_timeout_option,
    max_attempts_option,
    prompt_text_option,
)
from sdxl_split.cli.render_cmd import check_seeds, denoiser_spec
from sdxl_split.cli.render_options import (
    check_image_options,
    lora_serving_options,
    render_config_from,
    render_options,
)
from sdxl_split.cli.run_ray import RAY_ONLY, check_engine_options, ray_options, run_with_ray
from sdxl_split.shared.errors import EXIT_BAD_INPUT, EXIT_SOME_FAILED
from sdxl_split.shared.settings import GlobalOptions

# The encoder waits this long for its denoisers (already loaded when it starts) to come back.
ENCODER_WAIT_S = 30.0
DENOISER_ENTRY = "sdxl_split.denoiser_service.service:child_main"
ENCODER_ENTRY = "sdxl_split.encoder_service.service:child_main"


@click.command("run")
@click.argument("prompts", type=click.Path(path_type=Path), required=False)
@prompt_text_option()
@encoding_options
@lora_serving_options
@render_options
@click.option("--engine", type=click.Choice(["zmq", "ray"]), default="zmq", show_default=True,
              help="zmq: processes on this machine linked over ipc://; ray: Ray Data actor pools on this machine or "
                   "a cluster (needs the ray extra).")
@click.option("--denoisers", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Denoiser processes (zmq) or actors (ray) to start; they share the jobs by speed.")
@credits_option()
@max_attempts_option()
@job_timeout_option()
@faults_option()
@ray_options
@click.pass_context
def run(ctx: click.Context, prompts: Path | None, prompt_texts: tuple[str, ...], engine: str, denoisers: int,
        credits: int, max_attempts: int,
        job_timeout: float | None, faults, **kw) -> None:
    """Encode PROMPTS and render them, each side in its own process.

    PROMPTS is a prompt file (as `encode` reads it; `-` for stdin), or give --prompt TEXT instead.

    The encoder runs on --encoder-device (cpu), the denoiser(s) on --device (cuda if present).
    Embeddings stream to the denoisers as they are made, so the first image starts while later
    prompts are still being encoded. Re-running the same command renders only what is missing.
    At the end each process's own peak memory is printed side by side.

    --engine zmq (default) runs on this machine; Ctrl-C finishes in-flight images, journals and
    exits. --engine ray runs encoder and denoiser actor pools on Ray Data, locally or on a
    cluster (--ray-address auto); a dead actor is restarted and its batch retried.
    """
    opts: GlobalOptions = ctx.obj
    prompts = PromptInput(prompts, prompt_texts)
    check_engine_options(ctx, engine, denoisers)
    if engine == "ray":
        run_with_ray(opts, prompts, denoisers, faults, kw)
        return
    for name in RAY_ONLY:
        kw.pop(name)
    import dataclasses

    from sdxl_split.denoiser_service.spec import ServeSpec
    from sdxl_split.encoder_service.outcome import some_failed
    from sdxl_split.shared import specs
    from sdxl_split.shared.processes import describe_exit
    from sdxl_split.shared.supervisor import ChildGroup, ChildSpec
    from sdxl_split.shared.threads import run_threads

    choice = Encoding.pop_from(kw)
    check_image_options(kw)
    workdir = Path(tempfile.mkdtemp(prefix="sdxl-split-"))
    try:
        endpoint = f"ipc://{workdir}/link.ipc"
        # The whole prompt file and the model are checked before any process starts.
        encoding = encode_spec(opts, prompts, choice, batch_size=1, bind=endpoint, wait_s=ENCODER_WAIT_S,
                               curve_dir=None, max_attempts=max_attempts, job_timeout=job_timeout, faults=faults,
                               default_seed=kw["seed"])
        children = ChildGroup([ChildSpec(f"denoiser-{n}", DENOISER_ENTRY) for n in range(denoisers)],
                              ChildSpec("encoder", ENCODER_ENTRY), opts.verbosity, notice)
        with children:
            # This process never imports torch (1.7 s before anything could start): its children do, at once, and
            # say what CUDA devices it sees; the rest is checked and resolved here, once, into frozen specs.
            cuda_devices = children.cuda_devices()
            config = render_config_from(kw, cuda_devices=cuda_devices)
            encoder_threads, denoiser_threads = run_threads(choice.encoder_device == "cpu", denoisers,
                                                            config.device == "cpu")
            encoding = dataclasses.replace(encoding,
                                           config=dataclasses.replace(encoding.config, threads=encoder_threads))
            check_seeds(encoding.prompts_path, encoding.entries, config)
            serving = ServeSpec(denoiser=denoiser_spec(opts, config, choice, encoding.source,
                                                       metadata=kw["metadata"], lora_cache=kw["lora_cache"],
                                                       fuse_lora=kw["fuse_lora"], threads=denoiser_threads,
                                                       faults=faults, entries=encoding.entries),
                                endpoint=endpoint, credits=credits)
            if _all_rendered(encoding, serving, config, choice, opts):
                return
            outcome = children.run(specs.dumps(serving), specs.dumps(encoding))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if outcome.encoder.process.exitcode == EXIT_BAD_INPUT:
        sys.exit(EXIT_BAD_INPUT)  # it said why, in one line; nothing ran that a re-run would finish
    _print_side_by_side(outcome.children)
    summary = outcome.encoder.result
    for child in outcome.children:
        if child.process.exitcode not in (0, EXIT_SOME_FAILED):
            # Its jobs went to the others; whether that cost anything shows in the encoder's summary.
            click.echo(f"warning: {child.name} {describe_exit(child.process.exitcode)}", err=True)
    if summary is None:
        click.echo("error: the encoder stopped before it could report; re-run the same command to finish", err=True)
        sys.exit(EXIT_SOME_FAILED)
    click.echo(f"images in {config.out_dir}")
    if some_failed(summary):
        sys.exit(EXIT_SOME_FAILED)
    if outcome.interrupted:
        click.echo("the stop came after the last image: nothing is left to re-run")


def _all_rendered(encoding, serving, config, choice: Encoding, opts: GlobalOptions) -> bool:
    """A re-run whose images are all in --out, intact, renders nothing: their names come from the prompts.
    Their bytes are hashed only when every one exists; otherwise the encoder's journal check does that once."""
    from sdxl_split.denoiser_service.work_plan import check_jobs, distinct_jobs

    jobs, repeated = distinct_jobs(encoding.entries, encoding.settings, choice.extras().resolver(opts.cache_dir),
                                   config, serving.denoiser.identity)
    if not all((config.out_dir / name).is_file() for job in jobs for name in job.files):
        return False
    plan = check_jobs(jobs, repeated, config)
    for warning in plan.warnings():
        notice(warning)
    if plan.todo:
        return False
    click.echo(f"jobs: 0 rendered, {len(jobs)} already done; nothing to render")
    click.echo(f"images in {config.out_dir}")
    return True


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_side_by_side(children) -> None:
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
