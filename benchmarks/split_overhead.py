"""Benchmark: what splitting SDXL into an encoder and denoisers costs against one diffusers process.

    python benchmarks/split_overhead.py                 # tiny model: the ratios (about 11 minutes on 2 cores)
    python benchmarks/split_overhead.py --encoder-full  # full-size random weights: encoder prompts/s and batch error
    python benchmarks/split_overhead.py --syntax-full   # full-size random weights: plain against a1111 on long prompts

Ratios mode runs, on this machine, in one invocation, each ratio the median over --pairs pairs, each pair running
the compared couples A B B A (monolith and run; run-cached and render), every run a fresh process (or set of
processes) with its own empty cache unless it says "cached":
  monolith     a diffusers script: StableDiffusionXLPipeline(prompt=...) per prompt, PNGs written
  run          `sdxl-split run` from an empty cache
  run-cached   `sdxl-split run` with every embedding already cached
  render       `sdxl-split render --prompts` from a filled cache
  encode       `sdxl-split encode` alone, from an empty cache (and with a quarter of the prompts, for the
               encoder's marginal cost per prompt)
and the link's added time per job: a real encoder with every prompt cached, serving a no-op denoiser process over
tcp loopback, timed from the first dispatch to the last DONE in its journal.
Models use random weights: timings and memory are real, images are noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

MONOLITH = r"""
import sys, time, torch
from pathlib import Path
from diffusers import StableDiffusionXLPipeline
model, prompts, out, size, steps = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out.mkdir(parents=True, exist_ok=True)
pipe = StableDiffusionXLPipeline.from_pretrained(model)
pipe.set_progress_bar_config(disable=True)
for n, prompt in enumerate(prompts.read_text().splitlines()):
    image = pipe(prompt=prompt, num_inference_steps=steps, height=size, width=size,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    image.save(out / f"{n}.png")
"""

NOOP_DENOISER = r"""
import sys, threading
from sdxl_split.denoiser_service.denoiser_loop import DenoiserLoop, DenoiserLoopConfig
from sdxl_split.shared import protocol as p

def load():
    return lambda job: p.Done(job_id=job.job_id, attempt=job.attempt, images=(), seconds=0.0)

DenoiserLoop(DenoiserLoopConfig(endpoint=sys.argv[1], credits=2, name="noop")).run(load, threading.Event())
"""


def prompts_file(folder: Path, count: int) -> Path:
    path = folder / f"prompts-{count}.txt"
    path.write_text("".join(f"prompt number {n}, a lighthouse at dusk, oil painting\n" for n in range(count)))
    return path


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.last_cpu_s = 0.0  # CPU seconds of the process tree of the last timed run
        self.last_out: Path | None = None  # the output folder of the last `run` or `render`
        self.root = Path(tempfile.mkdtemp(prefix="sdxl-split-overhead-"))
        self.models = self.root / "models-cache"
        # One built-in tiny model shared by every run's cache (symlinked), built once here.
        self._cli("--model", "tiny", "model", "info", cache=self.models)

    def fresh_cache(self) -> Path:
        cache = Path(tempfile.mkdtemp(dir=self.root, prefix="cache-"))
        (cache / "models").mkdir()
        (cache / "models" / "tiny").symlink_to(self.models / "models" / "tiny")
        return cache

    def _cli(self, *args: str, cache: Path, env: dict | None = None) -> float:
        started, cpu_before = time.perf_counter(), children_cpu_s()
        done = subprocess.run([sys.executable, "-m", "sdxl_split.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "SDXL_SPLIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                                   **(env or {})})
        seconds = time.perf_counter() - started
        self.last_cpu_s = children_cpu_s() - cpu_before
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return seconds

    def render_flags(self) -> list[str]:
        return ["--size", f"{self.args.size}x{self.args.size}", "--steps", str(self.args.steps)]

    def monolith(self, prompts: Path) -> float:
        started, cpu_before = time.perf_counter(), children_cpu_s()
        subprocess.run([sys.executable, "-c", MONOLITH, str(self.models / "models" / "tiny"), str(prompts),
                        str(Path(tempfile.mkdtemp(dir=self.root))), str(self.args.size), str(self.args.steps)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
        self.last_cpu_s = children_cpu_s() - cpu_before
        return time.perf_counter() - started

    def run(self, prompts: Path, cache: Path) -> float:
        out = self.last_out = Path(tempfile.mkdtemp(dir=self.root))
        return self._cli("--model", "tiny", "run", str(prompts), "--out", str(out), *self.render_flags(), cache=cache)

    def render(self, prompts: Path, cache: Path) -> float:
        out = self.last_out = Path(tempfile.mkdtemp(dir=self.root))
        return self._cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out),
                         *self.render_flags(), cache=cache)

    def encode(self, prompts: Path, cache: Path) -> float:
        return self._cli("--model", "tiny", "encode", str(prompts), "--wait", "0",
                         "--bind", f"ipc://{cache}/link.ipc", cache=cache)

    def link_per_job_ms(self, prompts: Path, jobs: int) -> float:
        """A cached encode served to a no-op denoiser over tcp loopback: journal time per job."""
        cache = self.fresh_cache()
        self.encode(prompts, cache)  # fills the cache; the timed run below only reads it
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        noop = subprocess.Popen([sys.executable, "-c", NOOP_DENOISER, endpoint], env=os.environ)
        try:
            self._cli("--model", "tiny", "encode", str(prompts), "--bind", endpoint, "--wait", "60", cache=cache)
        finally:
            noop.kill()
        records = [json.loads(line) for path in (cache / "runs").glob("*.jsonl")
                   for line in path.read_text().splitlines()]
        timed = [r for r in records if r["event"] in ("dispatched", "done") and not r.get("reused")]
        first = min(r["t"] for r in timed if r["event"] == "dispatched")
        last = max(r["t"] for r in timed if r["event"] == "done")
        return (last - first) / jobs * 1000.0


def steady_s_per_image(out: Path) -> float:
    """The median gap between consecutive images' manifest times: seconds per image once rendering runs, with no
    start-up in it, and robust to the odd stall of a shared VM."""
    times = sorted(json.loads(line)["time"] for line in (out / "manifest.jsonl").read_text().splitlines())
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def children_cpu_s() -> float:
    """User + system CPU seconds of every waited-for descendant so far (run's children count once run reaps
    them). On a shared VM wall time swings by 20% between identical runs; CPU time says what work was added."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ratios(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    prompts, quarter = prompts_file(bench.root, args.prompts), prompts_file(bench.root, args.prompts // 4)
    rows: dict[str, list[float]] = {name: [] for name in
                                    ("monolith", "run", "run-cached", "render", "encode", "encode-quarter")}
    cpu: dict[str, list[float]] = {name: [] for name in rows}

    def timed(name: str, seconds: float) -> None:
        rows[name].append(seconds)
        cpu[name].append(bench.last_cpu_s)

    # Untimed: the first process to import diffusers after a change reads and compiles cold files (one monolith
    # took 32.7 s, the next 5.7).
    bench.monolith(quarter)
    bench.run(quarter, bench.fresh_cache())
    for pair in range(args.pairs):
        print(f"pair {pair + 1}/{args.pairs} ...", file=sys.stderr, flush=True)
        # A B B A: each compared couple runs twice, its two sides symmetric about the middle of the pair. This VM's
        # speed drifts by 10 to 20% over minutes (the same render took 21.1 to 31.2 s within ten minutes); a drift
        # that is linear over the pair then cancels in each side's sum, where alternating the order between pairs
        # only evened it out across them.
        cache = bench.fresh_cache()
        timed("monolith", bench.monolith(prompts))
        timed("run", bench.run(prompts, cache))
        timed("run-cached", bench.run(prompts, cache))
        timed("render", bench.render(prompts, cache))
        timed("render", bench.render(prompts, cache))
        timed("run-cached", bench.run(prompts, cache))
        timed("run", bench.run(prompts, bench.fresh_cache()))
        timed("monolith", bench.monolith(prompts))
        timed("encode", bench.encode(prompts, bench.fresh_cache()))
        timed("encode-quarter", bench.encode(quarter, bench.fresh_cache()))
    median = {name: statistics.median(values) for name, values in rows.items()}
    link_ms = statistics.median(bench.link_per_job_ms(prompts, args.prompts) for _ in range(args.pairs))
    shutil.rmtree(bench.root, ignore_errors=True)
    marginal_ms = (median["encode"] - median["encode-quarter"]) / (args.prompts - args.prompts // 4) * 1000.0
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}

    def paired(a: str, b: str) -> float:
        """Median over the pairs of a's two runs over b's: drift between pairs, and linear drift within one, cancel."""
        return statistics.median((rows[a][k] + rows[a][k + 1]) / (rows[b][k] + rows[b][k + 1])
                                 for k in range(0, len(rows[a]), 2))

    return {
        "seconds": rows, "median_s": median, "cpu_seconds": cpu, "median_cpu_s": median_cpu,
        "paired_ratios": {"run_empty_cache_vs_monolith": paired("run", "monolith"),
                          "run_cached_vs_render_prompts": paired("run-cached", "render")},
        "cpu_ratios": {"run_empty_cache_vs_monolith": median_cpu["run"] / median_cpu["monolith"],
                       "run_cached_vs_render_prompts": median_cpu["run-cached"] / median_cpu["render"]},
        "ratios": {
            "run_empty_cache_vs_monolith": median["run"] / median["monolith"],
            "run_cached_vs_render_prompts": median["run-cached"] / median["render"],
            "render_prompts_vs_monolith": median["render"] / median["monolith"],
            "run_cached_vs_monolith": median["run-cached"] / median["monolith"],
        },
        "encoder_marginal_ms_per_prompt": marginal_ms,
        "link_added_ms_per_job": link_ms,
        "targets": {"run_empty_cache_vs_monolith": 1.10, "run_cached_vs_render_prompts": 1.05,
                    "encoder_marginal_ms_per_prompt": 20.0, "link_added_ms_per_job": 5.0},
    }


def markdown(payload: dict) -> str:
    setup = payload["setup"]
    lines = [f"# Split overhead, {setup['date']} ({setup['cpu']}, {setup['cores']} cores)", "",
             f"- tiny model (random weights), {setup['prompts']} prompts, {setup['size']}x{setup['size']}, "
             f"{setup['steps']} steps; {setup['pairs']} pairs, each running its compared couples A B B A (ratios: "
             "median over the pairs of one side's two runs over the other's); every run a fresh process with an empty "
             "cache unless cached; CPU s = user + system time of the whole process tree", "",
             "| what | median s | runs (s) | median CPU s |", "| --- | ---: | --- | ---: |"]
    for name, values in payload["seconds"].items():
        lines.append(f"| {name} | {payload['median_s'][name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
                     f"{payload['median_cpu_s'][name]:.1f} |")
    targets = payload["targets"]
    lines += ["", "| ratio or cost | measured | target |", "| --- | ---: | ---: |"]
    for name, value in payload["ratios"].items():
        target = targets.get(name)
        lines.append(f"| {name} | {value:.3f}x | {f'<= {target:.2f}x' if target else '—'} |")
    for name, value in payload["paired_ratios"].items():
        lines.append(f"| {name}, median of the paired ratios | {value:.3f}x | <= {targets[name]:.2f}x |")
    for name, value in payload["cpu_ratios"].items():
        lines.append(f"| {name}, CPU time | {value:.3f}x | — |")
    marginal, limit = payload["encoder_marginal_ms_per_prompt"], targets["encoder_marginal_ms_per_prompt"]
    lines.append(f"| encoder marginal ms/prompt (all minus a quarter of the prompts, per prompt) | {marginal:.1f} | "
                 f"<= {limit:.0f} |")
    lines.append(f"| link added ms/job (no-op denoiser, tcp loopback) | {payload['link_added_ms_per_job']:.2f} | "
                 f"<= {targets['link_added_ms_per_job']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--encoder-full", action="store_true",
                        help="Instead: full-size encoder prompts/s for batch 1 and 8, threads 1 and 2, and the "
                             "batch-8 error against batch 1.")
    parser.add_argument("--syntax-full", action="store_true",
                        help="Instead: full-size encoder prompts/s on long prompts, plain against a1111 and comfy.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.encoder_full:
        from encoder_full import encoder_full  # this script's folder

        payload, text, stem = encoder_full(args)
    elif args.syntax_full:
        from prompt_syntax_full import syntax_full  # this script's folder

        payload, text, stem = syntax_full(args)
    else:
        import platform

        payload = ratios(args)
        payload["setup"] = {"date": dt.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count(), "prompts": args.prompts, "size": args.size,
                            "steps": args.steps, "pairs": args.pairs}
        text, stem = markdown(payload), f"split-overhead-{payload['setup']['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
