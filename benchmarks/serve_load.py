"""Benchmark: `sdxl-split serve` under load, against `render --prompts` doing the same work.

    python benchmarks/serve_load.py      # tiny model, 128x128, 4 steps, 4 rounds of 32 requests at 1 and 8 clients
    python benchmarks/serve_load.py --model PATH/sdxl-random --size 1024 --steps 25 --images 1,4 --concurrency 1 \
        --requests 4 --rounds 1 --device cuda --dtype fp16   # the GPU suite's serve row (benchmarks/gpu/suite.py)

C concurrent clients send R txt2img requests each (distinct prompts, N images each) to a real server process
with one local denoiser; the prompts are encoded into its cache first, so both sides only render. Reported:
requests/s, p50/p95/p99 latency per concurrency; the server's overhead per request (each request's latency at
the client less the denoiser's own time on its job, which the server reports in a Server-Timing header); the
server process's CPU time per request (HTTP, encoder side, dispatch: its denoiser children excluded); and the
throughput against `render --prompts` on the same settings and thread count. Rounds alternate a `render --prompts`
run with the server's rows, and each row's ratio is the median over rounds of its images/s over that round's
render: on a shared machine, runs a minute apart differ by up to 30% (measured here: 66 to 94 ms per image).
The model's weights are random: timings are real, images noise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def cli(args: argparse.Namespace, *words: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "sdxl_split.cli", "--model", args.model, *words], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sdxl-split {' '.join(words[:2])} failed: {done.stderr[-2000:]}")
    return done


def render_options(args: argparse.Namespace) -> list[str]:
    """The denoiser options both sides render with."""
    extra = [*(["--device", args.device] if args.device else []), *(["--dtype", args.dtype] if args.dtype else []),
             *(["--vae", args.vae] if args.vae else [])]
    return ["--size", f"{args.size}x{args.size}", "--steps", str(args.steps), *extra]


def prompts_file(folder: Path, count: int) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"prompt number {n}, a lighthouse at dusk", "seed": n}) + "\n"
                            for n in range(count)))
    return path


def start_server(args: argparse.Namespace, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "sdxl_split.cli", "--model", args.model, "serve", "--port", "0",
                               *render_options(args), "--preview-every", "0", "--out", str(log.parent / "served")],
                              env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if found := re.search(r"serving on (http://\S+?):? A1111", log.read_text()):
            url = found.group(1)
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["denoisers"] >= 1:
                    return server, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not come up; see {log}")


def load(url: str, count: int, clients: int, first: int, server: psutil.Process, images: int = 1) -> dict:
    """`count` requests (prompts first..first+count-1, `images` each) from `clients` concurrent clients on one
    event loop (threads would cost this machine's two cores more than the server does): their latencies, the
    part of each not spent denoising, throughput, and the server process's CPU seconds."""
    return asyncio.run(_load(url, count, clients, first, server, images))


async def _load(url: str, count: int, clients: int, first: int, server: psutil.Process, images: int) -> dict:
    latencies: list[float] = []
    not_denoising: list[float] = []
    numbers = iter(range(first, first + count))

    async def client(http: httpx.AsyncClient) -> None:
        for n in numbers:
            started = time.perf_counter()
            answer = await http.post(f"{url}/sdapi/v1/txt2img", json={
                "prompt": f"prompt number {n}, a lighthouse at dusk", "seed": n, "batch_size": images})
            answer.raise_for_status()
            took = time.perf_counter() - started
            latencies.append(took)
            not_denoising.append(took - denoise_seconds(answer.headers["server-timing"]))

    cpu = server.cpu_times()
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    used = server.cpu_times()
    return {"wall_s": wall, "requests": count, "images": count * images, "latencies": latencies,
            "not_denoising": not_denoising,
            "server_cpu_s": max(0.0, used.user + used.system - cpu.user - cpu.system)}


def denoise_seconds(header: str) -> float:
    """The `denoise` entry of a Server-Timing header, in seconds."""
    for part in header.split(","):
        name, *params = (piece.strip() for piece in part.split(";"))
        if name == "denoise":
            return next(float(p[4:]) for p in params if p.startswith("dur=")) / 1000
    raise SystemExit(f"no denoise entry in the Server-Timing header {header!r}")


def render_baseline(args: argparse.Namespace, prompts: Path, env: dict, out: Path) -> dict:
    """render --prompts on these prompts: its images/s once the model is loaded."""
    threads = str((os.cpu_count() or 2) if not args.device or args.device == "cpu" else 1)
    done = cli(args, "render", "--prompts", str(prompts), "--out", str(out), *render_options(args), "--prompt-syntax",
               "a1111", "--threads", threads, "--json", env=env)
    stats = json.loads(done.stdout)["stats"]
    return {"images": stats["images"], "render_s": stats["render_seconds"], "load_s": stats["load_seconds"],
            "s_per_image": stats["seconds_per_image"], "images_per_s": 1 / stats["seconds_per_image"]}


def slice_file(prompts: Path, first: int, count: int, to: Path) -> Path:
    to.write_text("".join(prompts.read_text().splitlines(keepends=True)[first:first + count]))
    return to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="Requests per row and round.")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", default="1", help="Comma list: images per request (A1111 batch_size), a row each.")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--vae", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="Where the md and json go.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdxl-split-serve-load-"))
    env = {**os.environ, "SDXL_SPLIT_CACHE": str(work / "cache"), "SDXL_SPLIT_BIND": f"ipc://{work}/link.ipc",
           "SDXL_SPLIT_WAIT": "0", "HF_HUB_OFFLINE": "1"}
    plan = [(clients, int(images)) for images in args.images.split(",") for clients in
            (int(c) for c in args.concurrency.split(","))]
    per_round = args.requests * (len(plan) + 1)
    prompts = prompts_file(work, 2 + per_round * args.rounds)
    cli(args, "encode", str(prompts), "--prompt-syntax", "a1111", env=env)  # both sides then only render
    server, url = start_server(args, env, work / "server.log")
    renders: list[dict] = []
    runs: dict[tuple[int, int], list[dict]] = {row: [] for row in plan}
    process = psutil.Process(server.pid)
    try:
        load(url, 2, 1, first=0, server=process)  # warm-up: the first jobs carry one-time costs
        for round_ in range(args.rounds):
            first = 2 + round_ * per_round
            renders.append(render_baseline(args, slice_file(prompts, first, args.requests, work / f"r{round_}.jsonl"),
                                           env, work / f"rendered-{round_}"))
            for n, (clients, images) in enumerate(plan):
                runs[clients, images].append(load(url, args.requests, clients, first + args.requests * (n + 1),
                                                  process, images))
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=120)
    write(summarise(args, runs, renders), args.out)


def summarise(args: argparse.Namespace, runs: dict[tuple[int, int], list[dict]], renders: list[dict]) -> dict:
    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    rows = []
    for (clients, images), row_runs in runs.items():
        latencies = [x for run in row_runs for x in run["latencies"]]
        requests = sum(run["requests"] for run in row_runs)
        rows.append({
            "clients": clients, "images_per_request": images, "requests": requests,
            "requests_per_s": statistics.median(run["requests"] / run["wall_s"] for run in row_runs),
            "images_per_s": statistics.median(run["images"] / run["wall_s"] for run in row_runs),
            "p50_ms": ms(latencies, 0.5), "p95_ms": ms(latencies, 0.95), "p99_ms": ms(latencies, 0.99),
            "not_denoising_p50_ms": ms([x for run in row_runs for x in run["not_denoising"]], 0.5),
            "server_cpu_ms_per_request": sum(run["server_cpu_s"] for run in row_runs) / requests * 1000,
            "throughput_vs_render": statistics.median(run["images"] / run["wall_s"] / render["images_per_s"]
                                                      for run, render in zip(row_runs, renders)),
        })
    single = next((row for row in rows if row["clients"] == 1 and row["images_per_request"] == 1), None)
    return {"date": dt.date.today().isoformat(), "model": Path(args.model).name, "device": args.device or "default",
            "size": args.size, "steps": args.steps, "requests_per_row_and_round": args.requests,
            "rounds": args.rounds, "cores": os.cpu_count(), "rows": rows, "render_prompts": renders,
            "overhead_ms_per_request": single["not_denoising_p50_ms"] if single else None,
            "note": f"{Path(args.model).name} model, random weights: timings are real, images are noise"}


def write(payload: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"serve-load-{payload['model']}-{payload['date']}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    renders = ", ".join(f"{run['s_per_image'] * 1000:.1f}" for run in payload["render_prompts"])
    overhead = payload["overhead_ms_per_request"]
    lines = [f"# serve under load, {payload['date']} ({payload['model']}, device {payload['device']}, "
             f"{payload['cores']} cores)", "",
             f"- {payload['size']}x{payload['size']}, {payload['steps']} steps; {payload['rounds']} "
             f"round{'s' if payload['rounds'] != 1 else ''} of "
             f"{payload['requests_per_row_and_round']} requests per row; prompts cached beforehand; {payload['note']}",
             f"- render --prompts, once per round: {renders} ms per image",
             f"- server overhead per request, one client, one image (p50 of the latency at the client less the "
             f"denoiser's own time on the job): {overhead:.1f} ms" if overhead is not None
             else "- no one-client, one-image row: no overhead figure",
             "- not denoising: each request's latency less the denoiser's time on it (with several clients, mostly "
             "the wait in the queue); server CPU: the server process, its denoiser children excluded", "",
             "| clients | images/request | requests/s | images/s | p50 ms | p95 ms | p99 ms | not denoising p50 ms | "
             "server CPU ms/request | images/s vs render |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in payload["rows"]:
        lines.append(f"| {row['clients']} | {row['images_per_request']} | {row['requests_per_s']:.2f} | "
                     f"{row['images_per_s']:.2f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['p99_ms']:.0f} | "
                     f"{row['not_denoising_p50_ms']:.1f} | {row['server_cpu_ms_per_request']:.1f} | "
                     f"{row['throughput_vs_render']:.3f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
