"""The bench's markdown report, built only from the JSON payload so the .md can always be remade from the .json."""

from __future__ import annotations

import statistics

from sdxl_split.bench.limits import reading
from sdxl_split.bench.results import memory_gib, metric_label, workload_ms
from sdxl_split.bench.seed_table import SEED_GPU, SEED_NOTE, SEED_WORKLOAD
from sdxl_split.bench.targets import target_lines

DASH = "—"


def _num(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _header(payload: dict) -> list[str]:
    env, bench = payload["environment"], payload["bench"]
    base = bench["base"]
    model = env["model"]
    on_gpu = env["device"].startswith("cuda")
    weights = " (random weights: memory and FLOPs are real, images are noise)" if model["random_weights"] else ""
    prompts = len(bench["prompts"])
    warmup = f" of {_count(bench['warmup_steps'], 'step')} (compiles, picks kernels, grows the allocator)" if bench.get(
        "warmup_steps") else ""
    lines = [
        f"# sdxl-split bench: {env['gpu'] or 'cpu'}, {env['date']}",
        "",
        f"- device: {env['device']}; GPU: {env['gpu'] or 'none'}; CPU: {env['cpu']} ({env['cpu_cores']} cores); "
        f"encoder device: {bench['encoder_device']}",
        f"- model: {model['spec']}{weights}; fingerprint {model['fingerprint']}",
        f"- workload: {base['width']}x{base['height']}, {_count(base['steps'], 'step')}, "
        f"{_count(base['images_per_prompt'], 'image')} per prompt (one batch), {_count(prompts, 'prompt')}, "
        f"{base['scheduler']}, guidance {base['guidance']}; one untimed warm-up{warmup}, then latency = median of "
        f"{_count(bench['repeats'], 'timed repeat')}; every row in a fresh process",
        "- memory in GiB (1024**3 bytes), per process: \"memory\" is torch.cuda.max_memory_allocated (the seed's "
        "\"GB\" column), reserved is the caching allocator's peak, NVML the driver's view (includes the CUDA "
        "context)",
        f"- torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, "
        f"python {env['python']}",
    ]
    loads = [r["load_avg_1m"] for r in payload["rows"] if r.get("load_avg_1m") is not None]
    if loads:
        lines.append(f"- machine load (1-min average at each row's end): up to {max(loads):.2f} on "
                     f"{env['cpu_cores']} cores; other work running alongside slows rows unevenly, by up to "
                     "100x when torch's threads spin-wait for a core (cpu_ms in the JSON is each repeat's process "
                     "CPU time: about threads x wall when the cores were free)")
    if not on_gpu:
        lines.append("- CPU latencies are not GPU latencies. On cpu the fp16 rows run in fp32 (half precision on "
                     "this CPU is ~18x slower), as their notes say. There is no GPU memory: peak RSS is the figure, "
                     "and it includes loading, which can peak above running (fp16 weights on disk upcast to fp32); "
                     "the split line's second figure leaves loading out")
    return lines


def _note(result: dict, base_steps: int, repeats: int) -> str:
    if result["status"] == "skipped":
        text = f"skipped: {result['error']}"
    elif result["status"] == "failed":
        text = f"FAILED: {result['error']}"
    else:
        parts = [result["note"] or ""]
        if result["side"] == "encoder":
            parts.append("latency = encoding every prompt once")
        if len(result["latencies_ms"]) != repeats:
            parts.append(_count(len(result["latencies_ms"]), "timed repeat"))
        full = workload_ms(result, base_steps)
        if full is not None and full != result["median_ms"]:
            parts.append(f"{base_steps}-step latency from the per-step figure: {full:,.1f} ms")
        text = "; ".join(filter(None, parts))
    return _cell(text)


def _row_line(result: dict, base_steps: int, repeats: int) -> str:
    ok = result["status"] == "ok"
    memory = result.get("memory") or {}
    technique = _cell(f"`{result['row']}` {result['technique']}")
    values = [
        memory.get("cuda_allocated_gib") if ok else None,
        result["median_ms"] if ok else None,
        memory.get("cuda_reserved_gib") if ok else None,
        memory.get("nvml_gib") if ok else None,
        memory.get("peak_rss_gib") if ok else None,
    ]
    cells = [_num(values[0]), _num(values[1], 1), _num(values[2]), _num(values[3]), _num(values[4]),
             _num(result["s_per_image"] if ok else None, 3),
             _num(result.get("denoise_ms_per_step") if ok else None, 1)]
    return f"| {technique} | " + " | ".join(cells) + f" | {_note(result, base_steps, repeats)} |"


def split_lines(split: dict | None) -> list[str]:
    if split is None:
        return []
    lines = [
        f"split (encoder + {split['denoiser_row']} denoiser) = {split['split_gib']:.2f} GiB vs monolith "
        f"{split['monolith_gib']:.2f} GiB ({metric_label(split['metric'])} per process, summed: "
        f"{split['split_over_monolith']:.2f}x the monolith; largest single process "
        f"{split['largest_process_gib']:.2f} GiB, {split['largest_over_monolith']:.2f}x)"
    ]
    run = split.get("after_load")
    if run is not None:
        lines.append(
            f"after loading (encode/denoise/decode phases only): split = {run['encoder_gib']:.2f} + "
            f"{run['denoiser_gib']:.2f} = {run['split_gib']:.2f} GiB vs monolith {run['monolith_gib']:.2f} GiB"
        )
    return lines


def _seed_section(payload: dict) -> list[str]:
    metric = payload["metric"]
    lines = [
        "",
        f"## Against the seed ({SEED_GPU}, {SEED_WORKLOAD})",
        "",
        f"- {SEED_NOTE}",
    ]
    if metric != "cuda_allocated_gib":
        lines.append("- ours is peak RSS on the CPU, the seed's is GPU memory allocated: the memory ratio is not "
                     "like for like, and neither is the latency one")
    lines += [
        "",
        "| seed technique | our row | seed GiB | ours GiB | ours/seed | seed ms | ours ms | ours/seed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in payload["seed"]:
        lines.append(
            f"| {row['seed_technique']} | `{row['row']}` | {_num(row['seed_memory_gib'])} | "
            f"{_num(row['memory_gib'])} | {_num(row['memory_ratio'], 3)} | {_num(row['seed_latency_ms'], 1)} | "
            f"{_num(row['latency_ms'], 1)} | {_num(row['latency_ratio'], 3)} |"
        )
    return lines


def markdown(payload: dict) -> str:
    lines = _header(payload) + [
        "",
        "| technique | memory (GiB) | latency (ms) | reserved (GiB) | NVML (GiB) | peak RSS (GiB) | s/image "
        "| denoise ms/step | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base_steps = payload["bench"]["base"]["steps"]
    lines += [_row_line(result, base_steps, payload["bench"]["repeats"]) for result in payload["rows"]]
    split = split_lines(payload.get("split_vs_monolith"))
    if split:
        lines += [""] + [f"{line}  " for line in split[:-1]] + split[-1:]  # two spaces: markdown line break
    if payload.get("seed") is not None:
        lines += _seed_section(payload)
    lines += reading(payload)
    lines += target_lines(payload)
    return "\n".join(lines) + "\n"


def progress_line(index: int, total: int, result: dict, metric: str) -> str:
    """One line per finished row, for stderr while the bench runs."""
    head = f"[{index}/{total}] {result['row']}: {result['status']}"
    if result["status"] != "ok":
        return f"{head} ({result['error']})"
    memory = memory_gib(result, metric)
    cpu = statistics.median(result["cpu_ms"]) if result["cpu_ms"] else None
    return (f"{head}, median {result['median_ms']:,.1f} ms (CPU time {_num(cpu, 1)} ms), {metric_label(metric)} "
            f"{_num(memory)} GiB (pid {result['pid']})")
