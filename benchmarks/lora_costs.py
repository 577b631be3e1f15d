"""Benchmark: what LoRAs cost a denoiser per job (tiny model, CPU, in this process).

    python benchmarks/lora_costs.py          # about a minute on 2 cores

Each figure is the median over --jobs jobs (one image each) after one warm-up job:
  none          no LoRA at all
  first load    a job whose LoRA is not loaded yet (file read + PEFT adapter injection), once per LoRA
  same          every job uses the same LoRA (PEFT layers active, no switch)
  alternating   jobs alternate between two LoRAs (set_adapters on every job)
  fused         --fuse-lora: the LoRA merged into the UNet's weights once, so steps cost what `none` does
The tiny model has few layers: the per-job switch cost grows with the number of LoRA-wrapped layers, so at full size
expect it larger in absolute terms, and the render itself far larger. Random weights: images are noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _setup(args: argparse.Namespace):
    """The tiny model, two UNet-only LoRAs, one prompt's record and the render settings."""
    from sdxl_split.denoiser_service.config import RenderConfig
    from sdxl_split.encoder_service.text_side import TextSide
    from sdxl_split.shared.embeddings import Embeddings
    from sdxl_split.shared.encoding_settings import encoding_settings
    from sdxl_split.shared.loras import LoraFinder
    from sdxl_split.shared.models.resolve import resolve_model
    from sdxl_split.shared.models.test_assets import tiny_lora
    from sdxl_split.shared.prompts import PromptEntry

    root = Path(tempfile.mkdtemp(prefix="sdxl-split-lora-"))
    (root / "loras").mkdir()
    for n, name in enumerate(("style", "detail")):
        (root / "loras" / f"{name}.safetensors").write_bytes(tiny_lora("unet", seed=n + 1))
    source = resolve_model("tiny", root / "cache")
    finder = LoraFinder(root / "loras", root / "cache")
    uses = {name: finder.find(name).use(0.8) for name in ("style", "detail")}
    entry = PromptEntry(line=1, prompt="a lighthouse at dusk")
    tensors = TextSide(source, "cpu", "fp32").encode([entry], None)[0].tensors
    settings = encoding_settings(source, root / "cache", "fp32", None)
    record = Embeddings(key="0" * 64, texts=entry.texts(), settings=settings, tensors=tensors)
    config = RenderConfig(out_dir=root / "out", width=args.size, height=args.size, steps=args.steps)
    return source, finder, uses, record, config


def measure(args: argparse.Namespace) -> dict:
    import torch

    from sdxl_split.denoiser_service.pipeline import build_denoiser
    from sdxl_split.shared.memory import MemoryMeter

    torch.set_num_threads(args.threads)
    source, finder, uses, record, config = _setup(args)
    meter = MemoryMeter()

    def timed(render, loras_for) -> list[float]:
        render.render(record, 0, 1, loras_for(0))  # warm-up
        seconds = []
        for job in range(args.jobs):
            started = time.perf_counter()
            render.render(record, job, 1, loras_for(job + 1))
            seconds.append(time.perf_counter() - started)
        return seconds

    plain = build_denoiser(source, config, meter, finder)
    rows = {"none": timed(plain, lambda job: ())}
    first = []
    for name in ("style", "detail"):
        started = time.perf_counter()
        plain.loras.apply((uses[name],))
        first.append(time.perf_counter() - started)
    rows["first load (adapter only)"] = first
    rows["same"] = timed(plain, lambda job: (uses["style"],))
    rows["alternating"] = timed(plain, lambda job: (uses["style" if job % 2 else "detail"],))
    fused = build_denoiser(source, config, meter, finder, fuse=(uses["style"],))
    rows["fused"] = timed(fused, lambda job: (uses["style"],))
    meter.close()
    median_ms = {name: statistics.median(values) * 1000 for name, values in rows.items()}
    return {"seconds": rows, "median_ms": median_ms,
            "switch_ms_per_job": median_ms["alternating"] - median_ms["same"],
            "unfused_ms_per_job": median_ms["same"] - median_ms["none"],
            "fused_vs_none_ms": median_ms["fused"] - median_ms["none"]}


def markdown(payload: dict) -> str:
    s = payload["setup"]
    lines = [f"# LoRA costs per job, {s['date']} (tiny model, CPU, {s['threads']} threads)", "",
             f"- {s['size']}x{s['size']}, {s['steps']} steps, 1 image per job, medians of {s['jobs']} jobs; UNet-only "
             "LoRAs of rank 4 on every attention projection; random weights", "",
             "| case | median ms/job |", "| --- | ---: |"]
    for name, value in payload["median_ms"].items():
        lines.append(f"| {name} | {value:.1f} |")
    lines += ["", f"- switching adapters (alternating - same): {payload['switch_ms_per_job']:+.1f} ms/job",
              f"- an unfused LoRA's PEFT layers (same - none): {payload['unfused_ms_per_job']:+.1f} ms/job",
              f"- fused against none: {payload['fused_vs_none_ms']:+.1f} ms/job"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    payload = measure(args)
    payload["setup"] = {"date": dt.date.today().isoformat(), "size": args.size, "steps": args.steps,
                        "jobs": args.jobs, "threads": args.threads}
    text = markdown(payload)
    stem = f"lora-costs-{payload['setup']['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
