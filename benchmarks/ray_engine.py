"""Benchmark: `run --engine ray` against the ZeroMQ `run` and a one-process diffusers monolith.

    pip install -e '.[ray]' && python benchmarks/ray_engine.py     # tiny model, 32 prompts (about 6 minutes)

Every run is a fresh process (or set of processes) with its own empty cache, on this machine; each figure is the
median of --pairs. Both engines give the encoder one thread and the denoiser every core (`run` does so by
itself; Ray gets --encoder-cpus 0.25 --denoiser-cpus 1.75, which round up to 1 and 2 threads within a local Ray's
2 CPUs). Ray's start-up (ray.init of a local Ray) is reported on its own line. Each engine's cost per image is
its marginal one: (wall time for N prompts - wall time for N/4) / (N - N/4), which leaves out what a run pays
once (interpreters, model loads, Ray's start and stop), and its pace while rendering: the median gap between
consecutive images in the full runs' manifest.jsonl. The marginal figure also carries the noise of two whole
runs' fixed costs (Ray's is about 15 s here, give or take a second); the pace has no start-up in it at all.
Models use random weights: timings and memory are real, images are noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from split_overhead import RESULTS, Bench, prompts_file, steady_s_per_image  # this script's folder

STARTUP = re.compile(r"ray start-up: ([0-9.]+) s")


def ray_run(bench: Bench, prompts: Path, cpus: tuple[str, str]) -> tuple[float, float, Path]:
    """(wall seconds, of which Ray's start-up, output folder) of one `run --engine ray` from an empty cache."""
    import subprocess

    out, cache = Path(tempfile.mkdtemp(dir=bench.root)), bench.fresh_cache()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdxl_split.cli", "--model", "tiny", "run", str(prompts), "--out",
                           str(out), *bench.render_flags(), "--engine", "ray", "--encoder-cpus", cpus[0],
                           "--denoiser-cpus", cpus[1]], capture_output=True, text=True,
                          env={**os.environ, "SDXL_SPLIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    found = STARTUP.search(done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"run --engine ray failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return wall, float(found.group(1)), out


def measure(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    prompts, quarter = prompts_file(bench.root, args.prompts), prompts_file(bench.root, args.prompts // 4)
    seconds: dict[str, list[float]] = {name: [] for name in (
        "monolith", "zmq run", "zmq run (quarter)", "ray run", "ray run (quarter)", "ray start-up")}
    steady: dict[str, list[float]] = {"zmq": [], "ray": []}
    cpus = tuple(args.ray_cpus.split(","))
    for pair in range(args.pairs):
        print(f"pair {pair + 1}/{args.pairs} ...", file=sys.stderr, flush=True)
        seconds["monolith"].append(bench.monolith(prompts))
        seconds["zmq run"].append(bench.run(prompts, bench.fresh_cache()))
        steady["zmq"].append(steady_s_per_image(bench.last_out))
        seconds["zmq run (quarter)"].append(bench.run(quarter, bench.fresh_cache()))
        wall, startup, out = ray_run(bench, prompts, cpus)
        seconds["ray run"].append(wall)
        seconds["ray start-up"].append(startup)
        steady["ray"].append(steady_s_per_image(out))
        seconds["ray run (quarter)"].append(ray_run(bench, quarter, cpus)[0])
    median = {name: statistics.median(values) for name, values in seconds.items()}
    extra = args.prompts - args.prompts // 4
    marginal = {engine: (median[f"{engine} run"] - median[f"{engine} run (quarter)"]) / extra
                for engine in ("zmq", "ray")}
    steady_median = {engine: statistics.median(values) for engine, values in steady.items()}
    return {"seconds": seconds, "median_s": median, "marginal_s_per_image": marginal,
            "monolith_s_per_image": median["monolith"] / args.prompts,
            "ray_marginal_vs_zmq": marginal["ray"] / marginal["zmq"],
            "steady_s_per_image": steady, "steady_median_s_per_image": steady_median,
            "ray_steady_vs_zmq": steady_median["ray"] / steady_median["zmq"], "target": 1.10}


def markdown(payload: dict) -> str:
    s = payload["setup"]
    lines = [f"# Ray engine against ZeroMQ and the monolith, {s['date']} ({s['cpu']}, {s['cores']} cores)", "",
             f"- tiny model (random weights), {s['prompts']} prompts (quarter: {s['prompts'] // 4}), "
             f"{s['size']}x{s['size']}, {s['steps']} steps; medians of {s['pairs']} runs, each a fresh process "
             "with an empty cache",
             f"- `run`: encoder 1 thread, denoiser 2; Ray: --encoder-cpus,--denoiser-cpus {s['ray_cpus']} (threads: "
             f"each rounded up); ray {s['ray']}", "",
             "| what | median s | runs (s) |", "| --- | ---: | --- |"]
    for name, values in payload["seconds"].items():
        lines.append(f"| {name} | {payload['median_s'][name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    marginal, steady = payload["marginal_s_per_image"], payload["steady_median_s_per_image"]
    lines += ["", f"- ray start-up (ray.init, local): {payload['median_s']['ray start-up']:.2f} s",
              f"- per image, marginal: zmq {marginal['zmq']:.3f} s, ray {marginal['ray']:.3f} s; "
              f"monolith {payload['monolith_s_per_image']:.3f} s (its whole wall time / prompts)",
              f"- ray / zmq per image, marginal: {payload['ray_marginal_vs_zmq']:.3f}x (target <= "
              f"{payload['target']:.2f}x)",
              f"- per image while rendering (median gap between images in manifest.jsonl, full runs): zmq "
              f"{steady['zmq']:.3f} s, ray {steady['ray']:.3f} s: {payload['ray_steady_vs_zmq']:.3f}x (target <= "
              f"{payload['target']:.2f}x)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--ray-cpus", default="0.25,1.75",
                        help="--encoder-cpus,--denoiser-cpus for the Ray runs (1,1: one thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import ray

    payload = measure(args)
    payload["setup"] = {"date": dt.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "prompts": args.prompts, "size": args.size, "steps": args.steps,
                        "pairs": args.pairs, "ray": ray.__version__, "ray_cpus": args.ray_cpus}
    text = markdown(payload)
    stem = f"ray-engine-{payload['setup']['date']}-cpus-{args.ray_cpus.replace(',', '-')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
