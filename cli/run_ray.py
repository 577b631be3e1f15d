"""`run --engine ray`: the same prompt file, options and outputs as the ZeroMQ `run`, on Ray Data actor pools."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from sdxl_split.cli.common import check_device, notice, read_prompts, resolve
from sdxl_split.cli.options import Encoding, apply_options
from sdxl_split.cli.render_options import render_config_from
from sdxl_split.shared.errors import EXIT_SOME_FAILED
from sdxl_split.shared.settings import GlobalOptions
from sdxl_split.shared.text import plural

MAX_LISTED = 10
MAX_LOCAL_DENOISERS = 16
# `run` options that only the ZeroMQ engine has; Ray retries and places work itself.
ZMQ_ONLY = ("credits", "max_attempts", "job_timeout")
RAY_ONLY = ("ray_address", "encoders", "encoder_cpus", "denoiser_cpus")


def ray_options(func):
    return apply_options(func, [
        click.option("--ray-address", default=None, envvar="RAY_ADDRESS",
                     help="--engine ray: the cluster to join (auto, or HOST:PORT of `ray start --head`) "
                          "[default: start Ray on this machine]."),
        click.option("--encoders", type=click.IntRange(1, 1024), default=1, show_default=True,
                     help="--engine ray: encoder actors (each loads the text encoders once)."),
        click.option("--encoder-cpus", type=click.FloatRange(0.25, 256), default=1.0, show_default=True,
                     help="--engine ray: CPUs each encoder actor asks for (its torch threads: this, rounded up)."),
        click.option("--denoiser-cpus", type=click.FloatRange(0.25, 256), default=1.0, show_default=True,
                     help="--engine ray: CPUs each denoiser actor asks for (its torch threads on a CPU: this, rounded "
                          "up; with --device cuda it also asks for one GPU)."),
    ])


def check_engine_options(ctx: click.Context, engine: str, denoisers: int) -> None:
    """An option the chosen engine ignores is a mistake worth hearing about, not silence."""
    if engine == "zmq" and denoisers > MAX_LOCAL_DENOISERS:
        raise click.UsageError(f"--denoisers {denoisers}: the zmq engine starts at most {MAX_LOCAL_DENOISERS} "
                               "processes on this machine; for more, use --engine ray on a cluster")
    given = {name for name in ZMQ_ONLY + RAY_ONLY
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    wrong = given & set(RAY_ONLY if engine == "zmq" else ZMQ_ONLY)
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(wrong))
        other = "ray" if engine == "zmq" else "zmq"
        raise click.UsageError(f"{flags} only applies to --engine {other}")


def run_with_ray(opts: GlobalOptions, prompts, denoisers: int, faults, kw: dict) -> None:
    """`prompts`: the command's PromptInput."""
    from sdxl_split.cli.render_cmd import check_seeds, denoiser_spec
    from sdxl_split.denoiser_service.work_plan import plan_jobs
    from sdxl_split.encoder_service.config import EncodeConfig
    from sdxl_split.ray_engine.driver import RayOptions, import_ray, run_on_ray
    from sdxl_split.ray_engine.stages import DenoiseStageSpec, EncodeStageSpec

    choice = Encoding.pop_from(kw)
    address = kw.pop("ray_address")
    config = render_config_from(kw, remote=address is not None)
    prompt_file = read_prompts(opts, prompts, choice, config.seed)
    check_seeds(prompt_file.path, prompt_file.entries, config)
    import_ray()  # a missing extra is found before any model work
    on_gpu = config.device.startswith("cuda")
    options = RayOptions(address=address, encoders=kw["encoders"], encoder_cpus=kw["encoder_cpus"],
                         denoisers=denoisers, denoiser_cpus=kw["denoiser_cpus"], denoiser_gpus=1 if on_gpu else 0)
    source = resolve(opts)
    denoiser = denoiser_spec(opts, config, choice, source, threads=1 if on_gpu else math.ceil(options.denoiser_cpus),
                             metadata=kw["metadata"], lora_cache=kw["lora_cache"], fuse_lora=kw["fuse_lora"],
                             faults=faults, entries=prompt_file.entries)
    settings = choice.settings(source, opts.cache_dir)
    plan = plan_jobs(prompt_file.entries, settings, choice.extras().resolver(opts.cache_dir), config,
                     denoiser.identity)
    for warning in plan.warnings():
        notice(warning)
    repeats = f"; {plural(plan.repeated_lines, 'line')} repeating an earlier one (rendered once)" \
        if plan.repeated_lines else ""
    notice(f"{plural(plan.done_images, 'image')} already in {config.out_dir}; {plan.todo_images} to render "
           f"({plural(len(plan.todo), 'job')}){repeats}")
    if not plan.todo:
        click.echo(f"nothing to render; images in {config.out_dir}")
        return
    encoding = EncodeStageSpec(
        source=source, settings=settings, cache_dir=opts.cache_dir, extras=choice.extras(), probe="",
        config=EncodeConfig(device=check_device(choice.encoder_device, "--encoder-device"), dtype=choice.dtype,
                            clip_skip=choice.clip_skip, threads=math.ceil(options.encoder_cpus)))
    result = run_on_ray(plan, encoding, DenoiseStageSpec(denoiser=denoiser, probe=""), options, notice)
    _report(result, config.out_dir, prompt_file.path)
    if result.errors:
        sys.exit(EXIT_SOME_FAILED)


def _report(result, out_dir: Path, prompts: Path) -> None:
    for note in result.notes:
        notice(f"note: {note}")
    for line, reason in result.errors[:MAX_LISTED]:
        notice(f"error: {prompts}:{line}: {reason}")
    if len(result.errors) > MAX_LISTED:
        notice(f"... and {len(result.errors) - MAX_LISTED} more")
    _print_memory(result.memory)
    click.echo(f"ray start-up: {result.startup_s:.1f} s")
    per_image = result.run_s / result.rendered if result.rendered else 0.0
    click.echo(f"{plural(result.rendered, 'image')} rendered, {result.existed} already there, "
               f"{plural(len(result.errors), 'job')} failed "
               f"in {result.run_s:.1f} s ({per_image:.2f} s/image after start-up)")
    click.echo(f"images in {out_dir}")


def _print_memory(memory: dict[str, dict[str, dict]]) -> None:
    click.echo("memory per stage (GiB = 1024^3 bytes; each actor measured itself):")
    rows = [("stage", "actors", "sum of peak RSS", "largest actor", "its peak RSS", "its CUDA alloc/reserved")]
    for stage, actors in memory.items():
        if not actors:
            rows.append((stage, "0", "-", "-", "-", "-"))
            continue
        name, largest = max(actors.items(), key=lambda item: item[1]["peak_rss_gib"])
        cuda = ("-" if largest.get("cuda_allocated_gib") is None
                else f"{largest['cuda_allocated_gib']:.2f}/{largest['cuda_reserved_gib']:.2f}")
        rows.append((stage, str(len(actors)), f"{sum(m['peak_rss_gib'] for m in actors.values()):.2f}", name,
                     f"{largest['peak_rss_gib']:.2f}", cuda))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
