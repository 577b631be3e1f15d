"""`sdxl-split bench`: the seed's technique table, every row in a fresh process, memory measured per process."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from sdxl_split.cli.common import check_device, default_dtype, notice, resolve
from sdxl_split.cli.render_cmd import EXIT_SOME_FAILED
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.settings import GlobalOptions
from sdxl_split.shared.text import plural

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"
CRASH_ENV = "SDXL_SPLIT_BENCH_CRASH_ROW"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.command("bench")
@click.option("--rows", "row_list", default="all", show_default=True,
              help="Comma list of row ids (listed above), or 'all'.")
@click.option("--size", default="1024x1024", show_default=True, help="WIDTHxHEIGHT, multiples of 8.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True)
@click.option("--images", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Images per prompt, rendered as one batch.")
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Timed repeats after one untimed warm-up; latency is their median.")
@click.option("--device", default=None, help="Denoiser device: cuda, cuda:N or cpu [default: cuda if present].")
@click.option("--encoder-device", default="cpu", show_default=True, help="Device of the encoder row.")
@click.option("--prompt", "prompts", multiple=True, default=(DEFAULT_PROMPT,), show_default=True,
              help="Prompt to render; repeat for several.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("benchmarks/results"), show_default=True,
              help="Folder for <gpu-or-cpu>-<date>.md, .json and .png.")
@click.option("--compare", type=click.Choice(["seed"]), default=None,
              help="Add the seed's own figures (A100 40GB) beside ours, with ours/seed ratios.")
@click.option("--row-timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds before a row's process is killed and the row reported failed.")
@click.option("--row-steps", multiple=True, metavar="ROW=N",
              help="Run ROW with N steps instead of --steps, to fit a time budget; its per-step figures still "
                   "compare and the table gives its full-step estimate. Repeatable.")
@click.option("--row-repeats", multiple=True, metavar="ROW=N", help="Timed repeats for ROW instead of --repeats.")
@click.option("--budget", type=click.FloatRange(min=1), default=None,
              help="Wall seconds for the whole run: rows that cannot start in time are reported skipped.")
@click.option("--append", is_flag=True,
              help="Merge into the results file of an earlier run (same GPU, date, model and workload): this "
                   "run's rows replace the same rows, the others stay.")
@click.option("--crash-row", default=None, hidden=True, envvar=CRASH_ENV,
              help="Test hook: this row's process kills itself after loading.")
@click.pass_obj
def bench(opts: GlobalOptions, row_list: str, size: str, steps: int, images: int, repeats: int,
          device: str | None, encoder_device: str, prompts: tuple[str, ...], out_dir: Path, compare: str | None,
          row_timeout: float, row_steps: tuple[str, ...], row_repeats: tuple[str, ...], budget: float | None,
          append: bool, crash_row: str | None) -> None:
    """Benchmark the seed's optimizations, one fresh process per row.

    \b
    Rows (fp16/SDPA "baseline" as in the seed; denoiser rows hold UNet + VAE only):
      fp32-classic, fp16-classic, fp16-sdpa, compile, model-offload, sequential-offload,
      group-offload, group-offload-tiny, group-offload-tiny-layers (each layer a group),
      vae-slicing, vae-slicing-sequential, tiny-vae, tiny-vae-slicing,
      tiny-vae-slicing-unet-batch (guidance halves through the UNet in turn),
      bf16-sdpa, fast (bf16 + fused QKV + channels_last), fast-compile, fast-compile-tiny,
      fast-compile-tiny-fp8, fast-compile-tiny-int8 (torchao quantized linears),
      fast-autotune (PyTorch's "Diffusion, Fast" minus int8),
      encoder (text side alone), monolith (everything in one process)

    Rows this device cannot run (offload or CUDA-graph compile on the CPU) are reported as skipped
    with the reason. On the CPU, fp16 rows run in fp32 and say so. Prints a markdown table and writes
    it, the raw figures (JSON) and a memory-vs-latency chart (PNG) to --out.
    """
    import torch

    from sdxl_split.bench.environment import environment
    from sdxl_split.bench.publish import build_payload, merge_previous, results_path, write_outputs
    from sdxl_split.bench.report import markdown, progress_line
    from sdxl_split.bench.results import headline_metric
    from sdxl_split.bench.rows import parse_row_values, select_rows
    from sdxl_split.bench.runner import BenchSettings, run_rows
    from sdxl_split.denoiser_service.config import RenderConfig, parse_size
    from sdxl_split.shared.encoding_settings import encoding_settings
    from sdxl_split.shared.models.resolve import DENOISE_COMPONENTS, TEXT_COMPONENTS, fingerprint

    rows = select_rows(row_list)
    if crash_row is not None and crash_row not in {row.id for row in rows}:
        raise UserError(f"--crash-row {crash_row!r} is not one of the selected rows")
    cuda_available = torch.cuda.is_available()
    device = check_device(device or ("cuda" if cuda_available else "cpu"))
    encoder_device = check_device(encoder_device, "--encoder-device")
    width, height = parse_size(size)
    if any(not text.strip() for text in prompts):
        raise UserError("--prompt must not be empty")
    settings = BenchSettings(
        rows=rows,
        base=RenderConfig(device=device, width=width, height=height, steps=steps, images_per_prompt=images),
        encoder_device=encoder_device, prompts=tuple(prompts), repeats=repeats, row_timeout_s=row_timeout,
        crash_row=crash_row, row_steps=parse_row_values(row_steps, "--row-steps"),
        row_repeats=parse_row_values(row_repeats, "--row-repeats"), budget_s=budget,
    )
    source = resolve(opts)  # built-in models are built here, once, not raced by the row processes
    encoding = encoding_settings(source, opts.cache_dir, default_dtype(encoder_device, None), None)
    model = {"spec": source.spec, "description": source.description, "kind": source.kind,
             "revision": source.revision, "random_weights": source.random_weights,
             "fingerprint": fingerprint(source, TEXT_COMPONENTS + DENOISE_COMPONENTS, opts.cache_dir)}
    env = environment(device, model, ["sdxl-split", *sys.argv[1:]])
    metric = headline_metric(device)
    if append:  # refuse a mismatched earlier file now, not after an hour of rows
        merge_previous(env, settings.as_dict(), [], results_path(out_dir, env))
    # SIGTERM unwinds like Ctrl-C: the running row's process is killed and the scratch folder removed.
    signal.signal(signal.SIGTERM, _interrupt)
    notice(f"bench: {len(rows)} rows on {device} ({env['gpu'] or env['cpu']}), each in a fresh process")
    results = run_rows(settings, opts, source, encoding, cuda_available,
                       progress=lambda i, n, result: notice(progress_line(i, n, result, metric)))
    bench_dict = settings.as_dict()
    if append:
        env, bench_dict, results = merge_previous(env, bench_dict, results, results_path(out_dir, env))
    payload = build_payload(env, bench_dict, results, compare == "seed", os.getpid())
    paths = write_outputs(payload, out_dir)
    click.echo(markdown(payload), nl=False)
    notice(f"wrote {paths['md']}, {paths['json'].name} and {paths['png'].name}")
    failed = [r["row"] for r in results if r["status"] == "failed"]
    if failed:
        notice(f"{plural(len(failed), 'row')} failed: {', '.join(failed)}")
        sys.exit(EXIT_SOME_FAILED)
