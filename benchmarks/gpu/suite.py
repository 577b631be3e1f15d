#!/usr/bin/env python3
"""The GPU proof on a bare, offline CUDA box, in one or two short calls: install sdxl-split from a folder of
wheels, build the full-size random-weights SDXL on the GPU, run `pytest -m gpu`, and run the bench table.

    python3 benchmarks/gpu/suite.py --part 1 --wheels .whl --out OUT    # tests + the core rows
    python3 benchmarks/gpu/suite.py --part 2 --wheels .whl --out OUT    # serve, compile, offload, the other rows
    python3 benchmarks/gpu/suite.py --dry-run --out OUT                 # here, on the CPU: tiny model and size

Each part keeps to --budget seconds: rows that cannot start in time are reported skipped, never silently lost.
Part 2 appends its rows to part 1's results file when both ran on the same GPU on the same day. Everything a
part produces (its markdown summary with each step's time, the log, the test results and the bench's md, json
and png) lands in --out. Standard library only: it runs before sdxl-split is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from suite_io import REQUIREMENT_CHECK, junit_properties, tree_digest  # noqa: E402  (this script's folder)

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = {"size": "1024x1024", "steps": 25, "images": 4}  # the seed's: 1024^2, 25 steps, 4 images per prompt
DRY_WORKLOAD = {"size": "64x64", "steps": 2, "images": 1}
# Time kept back at the end of a part for its summary and for bringing the files back.
RESERVE_S = 15.0
# The serve row: two model loads (server, render --prompts) and 4 + 4 requests of 1 and 4 images at the seed's size.
SERVE_LOAD = ["--size", WORKLOAD["size"].split("x")[0], "--steps", str(WORKLOAD["steps"]), "--images", "1,4",
              "--concurrency", "1", "--requests", "4", "--rounds", "1", "--dtype", "fp16"]
DRY_SERVE_LOAD = ["--size", "64", "--steps", "2", "--images", "1,2", "--concurrency", "1,2", "--requests", "2",
                  "--rounds", "1"]
SERVE_MAX_S = 240.0


@dataclasses.dataclass(frozen=True)
class Part:
    tests: bool
    # Run in this order (the bench runs the encoder first and the monolith last); a budget cuts the tail.
    rows: tuple[str, ...]
    repeats: int
    # ROW=N: fewer steps (per-step figures kept) or fewer repeats where a row would not fit.
    row_steps: tuple[str, ...] = ()
    row_repeats: tuple[str, ...] = ()
    # benchmarks/serve_load.py at the seed's size and steps, one and four images a request, before the rows.
    serve: bool = False


PARTS = {
    1: Part(tests=True, repeats=2,
            rows=("encoder", "fp16-sdpa", "tiny-vae-slicing", "group-offload-tiny", "monolith")),
    # fast-autotune is left out: max-autotune's kernel search for the UNet alone outlasts a call.
    # The open targets first (the fastest row, with and without fp8), then the rest as the budget allows.
    2: Part(tests=False, repeats=1, serve=True,
            rows=("fast-compile-tiny-fp8", "fast-compile-tiny", "group-offload-tiny-layers", "compile",
                  "group-offload", "model-offload", "sequential-offload", "vae-slicing-sequential", "tiny-vae",
                  "vae-slicing", "bf16-sdpa", "fast", "fp16-classic", "fp32-classic", "fast-compile"),
            row_steps=("sequential-offload=5", "fp32-classic=3", "vae-slicing-sequential=5")),
}


class Log:
    """Everything printed goes to the terminal and to the part's log file."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


@dataclasses.dataclass
class Step:
    name: str
    seconds: float
    outcome: str


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.out: Path = args.out
        self.work: Path = args.work
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.label = "dry-run" if args.dry_run else f"part{args.part}"
        self.log = Log(self.out / f"suite-{self.label}.log")
        self.steps: list[Step] = []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "SDXL_SPLIT_CACHE": str(self.work / "cache")}

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def run(self, name: str, argv: list[str], log_to: Path | None = None, timeout_s: float | None = None) -> int:
        """Run one step as a child process, its output streamed to the log; returns its exit code. Past
        `timeout_s` its whole process group is killed (a server it started would hold the GPU otherwise)."""
        shown = [arg if len(arg) < 200 else "<script>" for arg in argv]
        self.log.line(f"\n== {name}: {' '.join(shown)}")
        began = time.monotonic()
        sink = log_to.open("w", encoding="utf-8") if log_to else None
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=timeout_s is not None)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.start()
        assert proc.stdout is not None
        for text in proc.stdout:
            self.log.line(text.rstrip("\n"))
            if sink:
                sink.write(text)
        code = proc.wait()
        if timer:
            timer.cancel()
        if sink:
            sink.close()
        seconds = time.monotonic() - began
        self.steps.append(Step(name, seconds, f"timed out after {timeout_s:.0f} s" if killed.is_set() else
                               "ok" if code == 0 else f"exit {code}"))
        self.log.line(f"== {name}: exit {code} after {seconds:.1f} s")
        return code

    def python(self) -> list[str]:
        return [sys.executable]

    def sdxl_split(self, *args: str) -> list[str]:
        return [*self.python(), "-m", "sdxl_split.cli", *args]

    # ---- steps -----------------------------------------------------------------------------------------------

    def install(self) -> None:
        """pip, offline, from the wheels folder, into a target dir put first on PYTHONPATH: the box's own torch,
        transformers and accelerate stay as they are."""
        site = self.work / "site"
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        wheels: Path = self.args.wheels
        stamp = site / ".sdxl-split-tree"
        tree = tree_digest(wheels)
        if stamp.is_file() and stamp.read_text() == tree:
            self.steps.append(Step("install", 0.0, "already installed (same tree and wheels)"))
            return
        shutil.rmtree(site, ignore_errors=True)
        code = self.run("install", [*self.python(), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                                    str(wheels), "--no-deps", "--no-build-isolation", "--no-compile", "--target",
                                    str(site), *sorted(str(w) for w in wheels.glob("*.whl")), str(REPO)])
        if code != 0:
            raise SystemExit(f"install failed (exit {code}); see {self.log.file.name}")
        self.drop_unusable_torchao(site)
        stamp.write_text(tree)

    def drop_unusable_torchao(self, site: Path) -> None:
        """torchao is optional (--quantize), but diffusers and transformers import it whenever it is installed: one
        that cannot import with this box's torch would break every row. It is removed then, and the quantized rows
        are skipped with the reason."""
        if not (site / "torchao").is_dir():
            return
        code = self.run("torchao", [*self.python(), "-c", "import torchao.quantization, torchao; "
                                    "print('torchao', torchao.__version__, 'imports')"])
        if code != 0:
            for path in site.glob("torchao*"):
                shutil.rmtree(path, ignore_errors=True)
            self.steps[-1] = Step("torchao", self.steps[-1].seconds, "ok: removed, it does not import here")

    def check_requirements(self) -> None:
        """Every requirement of sdxl-split present in a version it accepts: a box that lacks one is named here,
        not as an ImportError halfway through."""
        code = self.run("requirements", [*self.python(), "-c", REQUIREMENT_CHECK])
        if code != 0:
            raise SystemExit("a requirement is missing or too old; see the log")

    def build_model(self) -> Path | None:
        if self.args.dry_run:
            return None
        folder = self.work / "cache" / "models" / "sdxl-random"
        if (folder / "sdxl_split_model.json").is_file():
            self.steps.append(Step("build sdxl-random", 0.0, "already built"))
            return folder
        code = self.run("build sdxl-random", self.sdxl_split("model", "init", "sdxl-random", str(folder),
                                                             "--device", self.args.device))
        if code != 0:
            raise SystemExit("building the full-size model failed; see the log")
        return folder

    def tests(self, model: Path | None) -> None:
        if model is not None:
            self.env["SDXL_SPLIT_GPU_MODEL"] = str(model)
        # -p no:logging: torch's structured-trace DEBUG records would bury the failures in thousands of lines.
        self.run("pytest -m gpu", [*self.python(), "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                   "-p", "no:logging", "-rfEs", "tests/gpu",
                                   f"--junitxml={self.out / 'gpu-tests.xml'}"],
                 log_to=self.out / "gpu-tests.log")

    def bench(self, part: Part) -> None:
        results = self.work / "results"
        results.mkdir(parents=True, exist_ok=True)
        # An earlier part's file travels back with the repo when the machine was given back between calls.
        for committed in (REPO / "benchmarks" / "results").glob("nvidia-*.json"):
            if not self.args.dry_run and not (results / committed.name).exists():
                shutil.copy2(committed, results / committed.name)
        rows = tuple(self.args.rows.split(",")) if self.args.rows else part.rows
        workload = DRY_WORKLOAD if self.args.dry_run else WORKLOAD
        if self.args.dry_run:  # compiling even the tiny model takes minutes on a small CPU; two rows prove the path
            rows = tuple(row for row in rows if "compile" not in row and "autotune" not in row)[:2]
        budget = self.left() - RESERVE_S
        if budget < 20:
            self.steps.append(Step("bench", 0.0, f"not started: {budget:.0f} s of budget left"))
            return
        argv = self.sdxl_split("--model", "tiny" if self.args.dry_run else "sdxl-random", "bench",
                               "--rows", ",".join(rows), "--size", workload["size"], "--steps",
                               str(workload["steps"]), "--images", str(workload["images"]),
                               "--repeats", "1" if self.args.dry_run else str(part.repeats),
                               "--device", self.args.device, "--budget", f"{budget:.0f}", "--append",
                               "--compare", "seed", "--out", str(results))
        if not self.args.dry_run:
            for pair in part.row_steps:
                argv += ["--row-steps", pair]
            for pair in part.row_repeats:
                argv += ["--row-repeats", pair]
        self.run("bench", argv)
        newest = max(results.glob("*.json"), key=lambda p: p.stat().st_mtime, default=None)
        if newest is not None:
            for suffix in (".json", ".md", ".png"):
                if newest.with_suffix(suffix).is_file():
                    shutil.copy2(newest.with_suffix(suffix), self.out / newest.with_suffix(suffix).name)

    def serve(self, model: Path | None) -> None:
        """benchmarks/serve_load.py: requests/s and latency of `sdxl-split serve` on this GPU, against `render
        --prompts` on the same work."""
        limit = min(SERVE_MAX_S, self.left() - RESERVE_S - 60)  # a minute at least left to the bench rows
        if limit < 90:
            self.steps.append(Step("serve", 0.0, f"not started: {self.left():.0f} s of budget left"))
            return
        load = DRY_SERVE_LOAD if self.args.dry_run else SERVE_LOAD
        model_name = "tiny" if model is None else str(model)
        self.run("serve", [*self.python(), "benchmarks/serve_load.py", "--model", model_name, *load, "--device",
                           self.args.device, "--out", str(self.out)], timeout_s=limit)

    def environment(self) -> None:
        if shutil.which("nvidia-smi"):
            self.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                    "--format=csv"])

    def summary(self) -> Path:
        lines = [f"# sdxl-split GPU suite, {self.label}", "",
                 f"- budget {self.args.budget:.0f} s; wall {time.monotonic() - self.started:.1f} s; "
                 f"device {self.args.device}; python {sys.version.split()[0]}", "",
                 "| step | seconds | outcome |", "| --- | ---: | --- |"]
        lines += [f"| {s.name} | {s.seconds:.1f} | {s.outcome} |" for s in self.steps]
        properties = junit_properties(self.out / "gpu-tests.xml")
        if properties:
            lines += ["", "## GPU tests", "", "| test | outcome | measured |", "| --- | --- | --- |"]
            for name, outcome, props in properties:
                lines.append(f"| {name} | {outcome} | {', '.join(f'{k}={v}' for k, v in props) or '—'} |")
        for table in sorted(self.out.glob("*.md")):
            if not table.name.startswith("suite-"):
                title = "Serve" if table.name.startswith("serve-load-") else "Bench"
                lines += ["", f"## {title} ({table.name})", "", table.read_text()]
        path = self.out / f"suite-{self.label}.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", type=int, choices=sorted(PARTS), default=1)
    parser.add_argument("--wheels", type=Path, default=None,
                        help="Folder of wheels from benchmarks/gpu/prepare.sh; installs offline into --work.")
    parser.add_argument("--out", type=Path, required=True, help="Folder for every file this part writes.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdxl-split-gpu"),
                        help="Install, model and results kept between the parts of one machine.")
    parser.add_argument("--budget", type=float, default=340.0, help="Wall seconds for this part.")
    parser.add_argument("--device", default=None, help="[default: cuda; cpu with --dry-run]")
    parser.add_argument("--rows", default=None,
                        help="Comma list of bench rows instead of the part's own, e.g. to fill an earlier gap.")
    parser.add_argument("--no-tests", action="store_true", help="Skip pytest -m gpu in part 1.")
    parser.add_argument("--dry-run", action="store_true",
                        help="On the CPU with the tiny model at 64x64: checks the suite itself works.")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    suite = Suite(args)
    part = PARTS[args.part]
    try:
        if args.wheels is not None:
            suite.install()
        suite.check_requirements()
        suite.environment()
        model = suite.build_model()
        if (part.tests or args.dry_run) and not args.no_tests:
            suite.tests(model)
        if part.serve:
            suite.serve(model)
        suite.bench(part)
    finally:
        summary = suite.summary()
        suite.log.line(f"\nwrote {summary} and the files beside it")
        suite.log.line(summary.read_text())
    return 0 if all(step.outcome.startswith(("ok", "already", "not started")) for step in suite.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
