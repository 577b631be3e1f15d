"""`run --engine ray` on the driver: start or join Ray, stream the planned jobs through an encoder actor pool and a
denoiser actor pool (Ray Data's map_batches), and gather the small manifest rows that come back."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_split.denoiser_service.work_plan import Plan
from sdxl_split.ray_engine.stages import DenoiseStage, DenoiseStageSpec, EncodeStage, EncodeStageSpec
from sdxl_split.shared import specs
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.wire_fields import entry_json


@dataclass(frozen=True)
class RayOptions:
    # None: start a Ray on this machine; "auto" or host:port: join that cluster.
    address: str | None
    encoders: int
    encoder_cpus: float
    denoisers: int
    denoiser_cpus: float
    # 1 on GPU nodes (--device cuda), 0 on CPUs.
    denoiser_gpus: float


@dataclass
class RayResult:
    startup_s: float = 0.0
    run_s: float = 0.0
    rendered: int = 0
    existed: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The last memory summary each actor sent, by stage and actor name.
    memory: dict[str, dict[str, dict]] = field(default_factory=lambda: {"encode": {}, "denoise": {}})


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[data]')") from None
    return ray


def _check_resources(ray, options: RayOptions) -> None:
    """A pool that cannot be placed would wait forever; say what is short and how to size the pools instead."""
    have = ray.cluster_resources()
    cpus = options.encoders * options.encoder_cpus + options.denoisers * options.denoiser_cpus
    gpus = options.denoisers * options.denoiser_gpus
    short = []
    if cpus > have.get("CPU", 0):
        short.append(f"{cpus:g} CPUs ({options.encoders} encoders x {options.encoder_cpus:g} + {options.denoisers} "
                     f"denoisers x {options.denoiser_cpus:g}) but Ray has {have.get('CPU', 0):g}")
    if gpus > have.get("GPU", 0):
        short.append(f"{gpus:g} GPUs ({options.denoisers} denoisers x 1) but Ray has {have.get('GPU', 0):g}")
    if short:
        raise UserError("the actor pools need " + " and ".join(short) + "; lower --encoders/--denoisers or "
                        "--encoder-cpus/--denoiser-cpus, or add nodes")


class _Probes:
    """Files the actors look for, to learn whether they see the driver's cache and output folders."""

    def __init__(self, folders: list[Path]) -> None:
        self.name = f".sdxl-split-ray-probe-{secrets.token_hex(8)}"
        self.paths = []
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / self.name
            path.write_text("written by the sdxl-split driver; deleted when the run ends\n")
            self.paths.append(path)

    def remove(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


def run_on_ray(plan: Plan, encode: EncodeStageSpec, denoise: DenoiseStageSpec, options: RayOptions,
               notice: Callable[[str], None]) -> RayResult:
    """Render every planned job; raises UserError with an actor's one-line reason if a stage cannot start."""
    ray = import_ray()
    result = RayResult()
    probes = _Probes([encode.cache_dir, denoise.denoiser.config.out_dir])
    encode = EncodeStageSpec(**{**vars(encode), "probe": probes.name})
    denoise = DenoiseStageSpec(**{**vars(denoise), "probe": probes.name})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    try:
        notice("starting a local Ray" if options.address is None else f"joining the Ray cluster at {options.address}")
        # Ray starts its workers at nice 15 so that its control plane stays responsive. The local Ray exists
        # only for this run, and there the actors are the work: beside two busy processes at nice 0 they got
        # 4% of a core each and the run did not finish in 4 minutes. A cluster keeps its own setting.
        local = {"_system_config": {"worker_niceness": 0}} if options.address is None else {}
        ray.init(address=options.address, include_dashboard=False if options.address is None else None,
                 log_to_driver=False, configure_logging=False, **local)
        result.startup_s = time.perf_counter() - started
        _check_resources(ray, options)
        started = time.perf_counter()
        _stream(ray, plan, encode, denoise, options, result)
        result.run_s = time.perf_counter() - started
    finally:
        probes.remove()
        ray.shutdown()
    return result


def _stream(ray, plan: Plan, encode: EncodeStageSpec, denoise: DenoiseStageSpec, options: RayOptions,
            result: RayResult) -> None:
    # Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1: a dead actor is restarted and
    # the batch it held is sent again. Names that derive from content and writes that are renames make the
    # retry exactly-once. (Setting them here is deprecated in Ray 2.60.)
    dataset = ray.data.from_items([{"job_id": job.job_id, "entry": json.dumps(entry_json(job.entry))}
                                   for job in plan.todo])
    # One row per batch: a record moves on (and an image starts) as soon as its prompt is encoded.
    dataset = dataset.map_batches(
        EncodeStage, fn_constructor_args=(specs.dumps(encode),), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=options.encoders), num_cpus=options.encoder_cpus)
    # Two calls in flight per denoiser: Ray Data unpacks the next row and packs the last result on a second
    # thread while one render runs (renders still run one at a time). With one, the model sat idle 5.7 ms
    # between images; with two, 0.7 ms.
    dataset = dataset.map_batches(
        DenoiseStage, fn_constructor_args=(specs.dumps(denoise),), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=options.denoisers, max_concurrent_calls_per_actor=2),
        num_cpus=options.denoiser_cpus, num_gpus=options.denoiser_gpus or None)
    for row in dataset.iter_rows():
        if row["fatal"]:
            raise UserError(row["fatal"])
        _collect(row, result)


def _collect(row: dict, result: RayResult) -> None:
    for note in json.loads(row["notes"] or "[]"):
        if note not in result.notes:
            result.notes.append(note)
    if row["error"]:
        result.errors.append((int(row["line"]), row["error"]))
    elif row["existed"]:
        result.existed += 1
    else:
        result.rendered += 1
    for stage, actor, memory in (("encode", row["encoder"], row["encoder_memory"]),
                                 ("denoise", row["denoiser"], row["denoiser_memory"])):
        if actor and memory and memory != "{}":
            result.memory[stage][actor] = json.loads(memory)
