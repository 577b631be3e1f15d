"""The benchmark's rows: the seed's technique table as fixed denoiser settings, plus encoder and monolith rows."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from sdxl_split.denoiser_service.config import RenderConfig, validate
from sdxl_split.shared.errors import UserError

Side = Literal["denoiser", "encoder", "monolith"]
# The seed's "default": fp16 weights with PyTorch's scaled_dot_product_attention.
BASELINE = {"dtype": "fp16", "attention": "sdpa"}


@dataclass(frozen=True)
class Row:
    """One benchmark row. `overrides` are RenderConfig fields; `seed_technique` names the seed row it matches."""

    id: str
    technique: str
    side: Side
    overrides: dict = field(default_factory=dict)
    seed_technique: str | None = None


ROWS: tuple[Row, ...] = (
    Row("fp32-classic", "unoptimized: fp32 + classic attention", "denoiser", {"dtype": "fp32", "attention": "default"},
        "unoptimized pipeline"),
    Row("fp16-classic", "fp16 + classic attention", "denoiser", {"dtype": "fp16", "attention": "default"}, "fp16"),
    # Our denoiser never holds the text encoders, which is exactly the seed's precomputed-embeddings setup.
    Row("fp16-sdpa", "fp16 + SDPA (baseline)", "denoiser", BASELINE, "default + precomputed text embeddings"),
    # The seed compiled with mode="reduce-overhead" (CUDA graphs); keep it so the figures compare.
    Row("compile", "baseline + torch.compile (reduce-overhead)", "denoiser",
        {**BASELINE, "compile": True, "compile_mode": "reduce-overhead"}, "default + torch.compile"),
    Row("model-offload", "baseline + model CPU offload", "denoiser", {**BASELINE, "offload": "model"},
        "default + model CPU offload"),
    Row("sequential-offload", "baseline + sequential CPU offload", "denoiser", {**BASELINE, "offload": "sequential"},
        "default + sequential CPU offload"),
    Row("group-offload", "baseline + group offload (blocks, overlapped)", "denoiser", {**BASELINE, "offload": "group"}),
    Row("vae-slicing", "baseline + VAE slicing", "denoiser", {**BASELINE, "vae_slicing": True},
        "default + VAE slicing"),
    Row("vae-slicing-sequential", "baseline + VAE slicing + sequential CPU offload", "denoiser",
        {**BASELINE, "vae_slicing": True, "offload": "sequential"},
        "default + VAE slicing + sequential CPU offload"),
    Row("tiny-vae", "baseline + tiny VAE (taesdxl)", "denoiser", {**BASELINE, "vae": "tiny"},
        "default + Tiny Autoencoder"),
    Row("tiny-vae-slicing", "baseline + tiny VAE + slicing", "denoiser",
        {**BASELINE, "vae": "tiny", "vae_slicing": True}),
    Row("encoder", "encoder process: tokenizers + 2 CLIP text encoders", "encoder"),
    Row("monolith", "monolith: text encoders + UNet + VAE in one process, fp16 + SDPA", "monolith", BASELINE,
        "fp16 + SDPA (default)"),
)
ROW_BY_ID = {row.id: row for row in ROWS}
CATALOGUE_ORDER = {row.id: index for index, row in enumerate(ROWS)}
# The denoiser row that holds what the monolith holds, minus the text encoders.
SPLIT_DENOISER_ROW = "fp16-sdpa"


@dataclass(frozen=True)
class PlannedRow:
    """A row made concrete for this run: its settings, a note on what changed, or why it cannot run here."""

    row: Row
    config: RenderConfig | None
    note: str = ""
    skip_reason: str | None = None


def select_rows(text: str) -> tuple[Row, ...]:
    """--rows: 'all' or a comma list of row ids, kept in the catalogue's order."""
    if text.strip() in ("", "all"):
        return ROWS
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in ROW_BY_ID]
    if unknown:
        raise UserError(f"unknown row {unknown[0]!r} in --rows; rows are: {', '.join(ROW_BY_ID)}")
    return tuple(row for row in ROWS if row.id in wanted)


def plan_row(row: Row, base: RenderConfig, cuda_available: bool) -> PlannedRow:
    """Apply the row's settings to `base`. The rows stay fixed; what this device cannot run is skipped, with
    validate()'s own reason, and half precision on the CPU runs in fp32 (it is ~18x slower there, so its
    timings would only measure the CPU's lack of fp16 kernels)."""
    if row.side == "encoder":
        return PlannedRow(row, None)
    overrides = dict(row.overrides)
    note = ""
    asked = overrides.get("dtype", base.dtype)
    if base.device == "cpu" and asked != "fp32":
        note = f"fp32 on cpu (row is {asked})"
        overrides["dtype"] = "fp32"
    config = replace(base, **overrides)
    try:
        validate(config, cuda_available)
    except UserError as err:
        return PlannedRow(row, config, note, skip_reason=str(err))
    return PlannedRow(row, config, note)
