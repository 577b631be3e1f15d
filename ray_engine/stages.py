"""The two Ray Data stages as plain classes (Ray instantiates one per actor): the encoder's and the denoiser's own
code behind a batch-in, batch-out call. A record travels between them as the JOB frames the ZeroMQ link sends:
the JSON header and the safetensors bytes, validated on arrival by the same decoder.

An actor never raises into Ray: a failure to start (a model missing on that node, say) comes back as a `fatal`
row that the driver turns into one line, instead of a remote traceback and endless restarts."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from sdxl_split.denoiser_service.naming import batch_files
from sdxl_split.denoiser_service.service import renderer_for, reply_function
from sdxl_split.denoiser_service.spec import DenoiserSpec
from sdxl_split.encoder_service.config import EncodeConfig
from sdxl_split.encoder_service.encode_pass import EncodeContext, run_encode
from sdxl_split.shared import protocol as p
from sdxl_split.shared import specs
from sdxl_split.shared.devices import cuda_index
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.errors import JobError, UserError, first_line
from sdxl_split.shared.jobs import job_id_for
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.resolve import DENOISE_COMPONENTS, ModelSource, fingerprint, text_widths
from sdxl_split.shared.prompt_extras import ExtrasSpec
from sdxl_split.shared.threads import use_threads, yield_cores
from sdxl_split.shared.wire_fields import entry_field

T = TypeVar("T")

# Columns of the rows between the stages and back to the driver (besides the input's job_id and entry).
STAGE_COLUMNS = ("job_id", "line", "prompt", "negative_prompt", "seed", "count", "key", "job", "record",
                 "encoder", "encoder_memory", "notes", "error", "fatal")
RESULT_COLUMNS = ("job_id", "line", "file", "sha256", "existed", "error", "fatal", "notes",
                  "encoder", "encoder_memory", "denoiser", "denoiser_memory")


@dataclass(frozen=True)
class EncodeStageSpec:
    source: ModelSource
    settings: EncodingSettings
    config: EncodeConfig
    cache_dir: Path
    extras: ExtrasSpec
    # A file the driver wrote in cache_dir: a node that sees it shares the driver's cache.
    probe: str


@dataclass(frozen=True)
class DenoiseStageSpec:
    denoiser: DenoiserSpec
    probe: str


def actor_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _failure(err: BaseException) -> str:
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    return f"{type(err).__name__}: {first_line(err)}"


def _shared_root(root: Path, probe: str, what: str, notes: list[str]) -> Path:
    """`root` when this node sees the driver's probe in it; otherwise a private temporary folder."""
    if (root / probe).is_file():
        return root
    notes.append(f"{actor_name()}: the cache {root} is not the driver's folder on this node; {what} without it "
                 "(mount it on every node to share embeddings and hashes)")
    return Path(tempfile.mkdtemp(prefix="sdxl-split-ray-"))


def _in_ray_actor() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _column(batch: dict, name: str) -> list:
    return list(batch[name]) if name in batch else [""] * len(batch["job_id"])


class EncodeStage:
    """Text encoders, loaded once per actor on the first prompt that misses the cache."""

    def __init__(self, spec_json: str) -> None:
        self.name = actor_name()
        self.notes: list[str] = []
        self.fatal = ""
        self._text_side = None
        try:
            self.spec = specs.loads(EncodeStageSpec, spec_json)
            self.meter = MemoryMeter(cuda_device=cuda_index(self.spec.config.device))
            root = _shared_root(self.spec.cache_dir, self.spec.probe, "encoding", self.notes)
            self.extras = self.spec.extras.resolver(root)
            self.context = EncodeContext(self.spec.settings, EmbeddingCache(root / "embeddings"), self.meter,
                                         batch_size=self.spec.config.batch_size, widths=text_widths(self.spec.source),
                                         extras_of=self.extras.resolve)
        except Exception as err:  # reported as a row; see the module docstring
            self.fatal = f"encoder actor {self.name}: {_failure(err)}"

    def __del__(self) -> None:
        # Ray Data lets a finished pool's actor exit gracefully, and the interpreter's teardown with torch and
        # transformers loaded costs seconds of CPU. On a node shared with a denoiser, the two images rendered
        # meanwhile took 1.0 to 1.6 s each instead of 0.4 (tiny model, 2 cores). Only the teardown is left now.
        if _in_ray_actor():
            yield_cores()

    def _load(self):
        if self._text_side is None:
            from sdxl_split.encoder_service.text_side import TextSide

            spec = self.spec
            self._text_side = TextSide(spec.source, spec.config.device, spec.config.dtype,
                                       inversions=self.extras.inversions)
        return self._text_side

    def __call__(self, batch: dict) -> dict:
        if not self.fatal:
            use_threads(self.spec.config.threads)  # Ray calls this on a thread of its own; see use_threads
        wanted = [str(w) for w in batch["job_id"]]
        rows: dict[str, dict] = {}
        warnings: list[str] = []
        error = ""
        if not self.fatal:
            try:
                entries = [entry_field(json.loads(text), "entry") for text in batch["entry"]]
                run_encode(entries, replace(self.context, warn=warnings.append), self._load, self._sink(rows))
            except (UserError, OSError) as err:
                error = _failure(err)
            except Exception as err:  # a failed forward pass, a broken tokenizer: every row of the batch says so
                self.fatal = f"encoder actor {self.name}: {_failure(err)}"
        memory = json.dumps(self.meter.summary()) if not self.fatal else "{}"
        notes = json.dumps(self.notes + warnings)
        self.notes.clear()
        out = {name: [] for name in STAGE_COLUMNS}
        for job_id in wanted:
            row = rows.get(job_id) or {"job_id": job_id, "error": error or self._why_missing(warnings)}
            row.update(encoder=self.name, encoder_memory=memory, notes=notes, fatal=self.fatal)
            for name in STAGE_COLUMNS:
                out[name].append(row.get(name, b"" if name in ("job", "record") else ""))
        return out

    @staticmethod
    def _why_missing(warnings: list[str]) -> str:
        # The driver and this node disagree about the work (its LoRA files differ), or the prompt was refused.
        return "; ".join(warnings) or "this node computed a different job for the line (are its LoRA and " \
                                      "embedding files the driver's?)"

    def _sink(self, rows: dict[str, dict]):
        def sink(entry, record, data: bytes, loras: tuple) -> None:
            job_id = job_id_for(record.key, entry.seed, entry.count, loras)
            header, payload = p.encode(p.Job.build(job_id, 1, entry, record, data, loras))
            # -1 and 0: the line leaves seed and count to the run's options.
            rows[job_id] = {"job_id": job_id, "line": entry.line, "prompt": entry.prompt,
                         "negative_prompt": entry.negative_prompt or "",
                         "seed": -1 if entry.seed is None else entry.seed,
                         "count": 0 if entry.count is None else entry.count, "key": record.key,
                         "job": header, "record": payload}

        return sink


class DenoiseStage:
    """UNet and VAE, loaded once per actor when it starts (while the encoders work), rendering one job per row."""

    def __init__(self, spec_json: str) -> None:
        self.name = actor_name()
        self.notes: list[str] = []
        self.fatal = ""
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._threads: int | None = None
        try:
            self.spec = specs.loads(DenoiseStageSpec, spec_json)
            spec = self.spec.denoiser
            self._threads = spec.threads
            out_dir = spec.config.out_dir
            if not (out_dir / self.spec.probe).is_file():
                raise UserError(f"--out {out_dir} is not the driver's folder on this node; give every node the same "
                                "shared mount")
            self._check_model(spec)
            self.meter = MemoryMeter(cuda_device=cuda_index(spec.config.device))
            self.renderer = renderer_for(spec, self.meter, self.notes.append)
            self.reply = reply_function(self.renderer, spec)
            # Load now, while the encoders work, on the thread every render will run on.
            self._on_model_thread(lambda: self.renderer.denoiser)
        except Exception as err:  # reported as a row; see the module docstring
            self.fatal = f"denoiser actor {self.name}: {_failure(err)}"

    def _on_model_thread(self, work: Callable[[], T]) -> T:
        """Run torch work on this actor's one model thread. OpenMP gives each thread that runs parallel work a
        team of its own; with the load on Ray's main thread and the renders on its call thread, two teams
        shared the cores and libgomp cut its spin-waiting to almost nothing: every small op then waited for a
        sleeping worker to wake (tiny model, 2 cores: 0.58 s an image against 0.33 in `run`)."""
        def on_this_thread() -> T:
            use_threads(self._threads)
            return work()

        return self._model_thread.submit(on_this_thread).result()

    def _check_model(self, spec: DenoiserSpec) -> None:
        """Same names must mean same pixels: a node whose model files differ from the driver's refuses to work."""
        if spec.source.kind == "hub":
            return
        root = _shared_root(spec.cache_dir, self.spec.probe, "hashing the model", self.notes)
        here = fingerprint(spec.source, DENOISE_COMPONENTS, root)
        if here != spec.identity.fingerprint:
            raise UserError(f"the model at {spec.source.location} differs from the driver's ({here[:19]} vs "
                            f"{spec.identity.fingerprint[:19]}); give every node the same files")

    def __call__(self, batch: dict) -> dict:
        return self._on_model_thread(lambda: self._rows(batch))

    def _rows(self, batch: dict) -> dict:
        out = {name: [] for name in RESULT_COLUMNS}

        def emit(**row) -> None:
            for name in RESULT_COLUMNS:
                out[name].append(row.get(name, False if name == "existed" else ""))

        passed = {name: _column(batch, name) for name in ("job_id", "line", "encoder", "encoder_memory", "notes",
                                                          "error", "fatal")}
        for i, job_id in enumerate(passed["job_id"]):
            common = {name: passed[name][i] for name in ("job_id", "line", "encoder", "encoder_memory")}
            common["line"] = int(common["line"] or 0)
            notes = json.dumps(json.loads(passed["notes"][i] or "[]") + self.notes)
            self.notes.clear()
            if passed["fatal"][i] or self.fatal:
                emit(**common, notes=notes, fatal=passed["fatal"][i] or self.fatal, denoiser=self.name)
                continue
            if passed["error"][i]:
                emit(**common, notes=notes, error=passed["error"][i], denoiser=self.name)
                continue
            for row in self._render(job_id, bytes(batch["job"][i]), bytes(batch["record"][i])):
                emit(**common, **row, notes=notes, denoiser=self.name,
                     denoiser_memory=json.dumps(self.meter.summary()))
                notes = "[]"
        return out

    def _render(self, job_id: str, header: bytes, payload: bytes) -> list[dict]:
        """Validate the frames exactly as the ZeroMQ denoiser does, then render (or find) the job's images."""
        try:
            job = p.decode([header, payload])
        except p.ProtocolError as err:
            return [{"error": f"refused the job: {err}"}]
        if not isinstance(job, p.Job) or job.job_id != job_id:
            return [{"error": "refused the job: its header does not match its row"}]
        spec = self.spec.denoiser
        try:
            names = batch_files(job.record.key, job.entry, spec.config, spec.identity, job.loras)[3]
        except JobError as err:
            return [{"error": str(err)}]
        there = {name for name in names if self.renderer.out.exists(name)}
        reply = self.reply(job)
        if isinstance(reply, p.Error):
            return [{"error": reply.reason}]
        return [{"file": image.file, "sha256": image.sha256, "existed": image.file in there} for image in reply.images]
