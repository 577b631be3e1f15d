"""Runs the selected rows one after another, each in a fresh process: encoder first, monolith last."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdxl_split.bench.job import RowTask, source_dict
from sdxl_split.bench.launcher import run_in_fresh_process
from sdxl_split.bench.results import blank_result
from sdxl_split.bench.rows import ROW_BY_ID, PlannedRow, Row, plan_row
from sdxl_split.bench.timing import WARMUP_STEPS
from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.shared.embedding_cache import EmbeddingCache, Hit
from sdxl_split.shared.encoding_settings import EncodingSettings, embedding_key
from sdxl_split.shared.models.resolve import ModelSource
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.settings import GlobalOptions

_RUN_ORDER = {"encoder": 0, "denoiser": 1, "monolith": 2}
# Under this many seconds of --budget left, a row is not started: loading alone takes longer at full size.
MIN_ROW_S = 15.0


@dataclass(frozen=True)
class BenchSettings:
    """Everything a bench run was asked for, fixed by the CLI."""

    rows: tuple[Row, ...]
    base: RenderConfig
    encoder_device: str
    prompts: tuple[str, ...]
    repeats: int
    row_timeout_s: float
    crash_row: str | None = None
    # Rows shortened (fewer steps) or repeated less, to fit a time budget; by row id.
    row_steps: dict[str, int] = field(default_factory=dict)
    row_repeats: dict[str, int] = field(default_factory=dict)
    # Wall seconds for the whole run: a row that cannot start in time is skipped, a running one is cut off.
    budget_s: float | None = None

    def as_dict(self) -> dict:
        return {"rows": [row.id for row in self.rows], "base": self.base.as_dict(),
                "encoder_device": self.encoder_device, "prompts": list(self.prompts), "repeats": self.repeats,
                "row_timeout_s": self.row_timeout_s, "row_steps": dict(self.row_steps),
                "row_repeats": dict(self.row_repeats), "budget_s": self.budget_s, "warmup_steps": WARMUP_STEPS}


def _missing_embeddings(opts: GlobalOptions, prompts: tuple[str, ...], encoding: EncodingSettings) -> bool:
    cache = EmbeddingCache(opts.embeddings_dir)
    return any(not isinstance(cache.lookup(embedding_key(PromptEntry(line=1, prompt=text).texts(), encoding)), Hit)
               for text in prompts)


def plan(bench: BenchSettings, opts: GlobalOptions, encoding: EncodingSettings, cuda_available: bool
         ) -> list[PlannedRow]:
    """The rows to run, in run order. Denoiser rows read embeddings from the cache, so when it lacks them the
    encoder row runs too, even if not selected."""
    planned = [plan_row(row, bench.base, cuda_available, bench.row_steps.get(row.id)) for row in bench.rows]
    ids = {p.row.id for p in planned}
    wants_cache = any(p.row.side == "denoiser" and p.skip_reason is None for p in planned)
    if wants_cache and "encoder" not in ids and _missing_embeddings(opts, bench.prompts, encoding):
        encoder = plan_row(ROW_BY_ID["encoder"], bench.base, cuda_available)
        planned.append(PlannedRow(encoder.row, None, "not selected: run to fill the embedding cache"))
    return sorted(planned, key=lambda p: _RUN_ORDER[p.row.side])


def _settings_of(planned: PlannedRow, bench: BenchSettings, encoding: EncodingSettings) -> dict:
    if planned.config is None:
        return {"device": bench.encoder_device, "dtype": encoding.dtype}
    return planned.config.as_dict()


def run_rows(bench: BenchSettings, opts: GlobalOptions, source: ModelSource, encoding: EncodingSettings,
             cuda_available: bool, progress: Callable[[int, int, dict], None]) -> list[dict]:
    """Run every planned row and return one result record per row, in run order."""
    planned = plan(bench, opts, encoding, cuda_available)
    results: list[dict] = []
    encoder_failed: str | None = None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sdxl-split-bench-") as workdir:
        for index, item in enumerate(planned, start=1):
            record = blank_result(item, _settings_of(item, bench, encoding))
            left = None if bench.budget_s is None else bench.budget_s - (time.monotonic() - started)
            if item.skip_reason is not None:
                record.update(status="skipped", error=item.skip_reason)
            elif left is not None and left < MIN_ROW_S:
                record.update(status="skipped", error=f"not started: {left:.0f} s were left of the "
                                                      f"{bench.budget_s:.0f} s --budget")
            elif item.row.side == "denoiser" and encoder_failed is not None:
                # Saves a process start per row, each of which would only find the cache empty.
                record.update(status="failed", error=f"no embeddings: the encoder row failed ({encoder_failed})")
            else:
                job = RowTask(row_id=item.row.id, side=item.row.side, source=source_dict(source),
                             cache_dir=str(opts.cache_dir), prompts=bench.prompts, encoding=asdict(encoding),
                             encoder_device=bench.encoder_device,
                             render=item.config.as_dict() if item.config is not None else None,
                             repeats=bench.row_repeats.get(item.row.id, bench.repeats),
                             crash=item.row.id == bench.crash_row, verbosity=opts.verbosity)
                timeout = bench.row_timeout_s if left is None else min(bench.row_timeout_s, left)
                outcome = run_in_fresh_process(job, Path(workdir), timeout)
                record.update({key: value for key, value in outcome.items() if key in record})
                if (item.row.side == "encoder" and record["status"] != "ok"
                        and _missing_embeddings(opts, bench.prompts, encoding)):
                    encoder_failed = record["error"]
            results.append(record)
            progress(index, len(planned), record)
    return results
