"""Runs the selected rows one after another, each in a fresh process: encoder first, monolith last."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sdxl_split.bench.job import RowJob, source_dict
from sdxl_split.bench.launcher import run_in_fresh_process
from sdxl_split.bench.results import blank_result
from sdxl_split.bench.rows import ROW_BY_ID, PlannedRow, Row, plan_row
from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.embeddings import EncodingSettings, embedding_key
from sdxl_split.shared.models.resolve import ModelSource
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.settings import GlobalOptions

_RUN_ORDER = {"encoder": 0, "denoiser": 1, "monolith": 2}


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

    def as_dict(self) -> dict:
        return {"rows": [row.id for row in self.rows], "base": self.base.as_dict(),
                "encoder_device": self.encoder_device, "prompts": list(self.prompts), "repeats": self.repeats,
                "row_timeout_s": self.row_timeout_s}


def _missing_embeddings(opts: GlobalOptions, prompts: tuple[str, ...], encoding: EncodingSettings) -> bool:
    cache = EmbeddingCache(opts.embeddings_dir)
    return any(not cache.lookup(embedding_key(PromptEntry(line=1, prompt=text).texts(), encoding)).hit
               for text in prompts)


def plan(bench: BenchSettings, opts: GlobalOptions, encoding: EncodingSettings, cuda_available: bool
         ) -> list[PlannedRow]:
    """The rows to run, in run order. Denoiser rows read embeddings from the cache, so when it lacks them the
    encoder row runs too, even if not selected."""
    planned = [plan_row(row, bench.base, cuda_available) for row in bench.rows]
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
    with tempfile.TemporaryDirectory(prefix="sdxl-split-bench-") as workdir:
        for index, item in enumerate(planned, start=1):
            record = blank_result(item, _settings_of(item, bench, encoding))
            if item.skip_reason is not None:
                record.update(status="skipped", error=item.skip_reason)
            elif item.row.side == "denoiser" and encoder_failed is not None:
                # Saves a process start per row, each of which would only find the cache empty.
                record.update(status="failed", error=f"no embeddings: the encoder row failed ({encoder_failed})")
            else:
                job = RowJob(row_id=item.row.id, side=item.row.side, source=source_dict(source),
                             cache_dir=str(opts.cache_dir), prompts=bench.prompts, encoding=asdict(encoding),
                             encoder_device=bench.encoder_device,
                             render=item.config.as_dict() if item.config is not None else None,
                             repeats=bench.repeats, crash=item.row.id == bench.crash_row,
                             verbosity=opts.verbosity)
                outcome = run_in_fresh_process(job, Path(workdir), bench.row_timeout_s)
                record.update({key: value for key, value in outcome.items() if key in record})
                if (item.row.side == "encoder" and record["status"] != "ok"
                        and _missing_embeddings(opts, bench.prompts, encoding)):
                    encoder_failed = record["error"]
            results.append(record)
            progress(index, len(planned), record)
    return results
