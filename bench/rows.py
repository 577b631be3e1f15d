"""The benchmark's rows: the seed's technique table as fixed denoiser settings, plus encoder and monolith rows."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from sdxl_split.denoiser_service.config import RenderConfig, validate
from sdxl_split.shared.errors import UserError

Side = Literal["denoiser", "encoder", "monolith"]
# The seed's "default": fp16 weights with PyTorch's scaled_dot_product_attention.
BASELINE = {"dtype": "fp16", "attention": "sdpa"}
# PyTorch's "Diffusion, Fast" recipe (bf16, SDPA, fused QKV, channels_last, then compile), minus int8 quantization.
FAST = {"dtype": "bf16", "attention": "sdpa", "channels_last": True, "fuse_qkv": True}
FAST_COMPILED = {**FAST, "compile": True, "compile_vae": True}


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
    Row("group-offload", "baseline + group offload (UNet blocks of <= 128 MiB, streamed)", "denoiser",
        {**BASELINE, "offload": "group"}),
    Row("group-offload-tiny", "baseline + group offload + tiny VAE + slicing", "denoiser",
        {**BASELINE, "offload": "group", "vae": "tiny", "vae_slicing": True}),
    # The same with every layer its own group: what --offload group did before it grouped by size.
    Row("group-offload-tiny-layers", "baseline + group offload, each layer a group (--offload-group-mib 0) + tiny "
        "VAE + slicing", "denoiser",
        {**BASELINE, "offload": "group", "offload_group_mib": 0, "vae": "tiny", "vae_slicing": True}),
    Row("vae-slicing", "baseline + VAE slicing", "denoiser", {**BASELINE, "vae_slicing": True},
        "default + VAE slicing"),
    Row("vae-slicing-sequential", "baseline + VAE slicing + sequential CPU offload", "denoiser",
        {**BASELINE, "vae_slicing": True, "offload": "sequential"},
        "default + VAE slicing + sequential CPU offload"),
    Row("tiny-vae", "baseline + tiny VAE (taesdxl)", "denoiser", {**BASELINE, "vae": "tiny"},
        "default + Tiny Autoencoder"),
    Row("tiny-vae-slicing", "baseline + tiny VAE + slicing", "denoiser",
        {**BASELINE, "vae": "tiny", "vae_slicing": True}),
    # The same, with guidance's two halves through the UNet one after the other: half its activations.
    Row("tiny-vae-slicing-unet-batch", "baseline + tiny VAE + slicing + UNet in guidance halves (--unet-batch 4)",
        "denoiser", {**BASELINE, "vae": "tiny", "vae_slicing": True, "unet_batch": 4}),
    Row("bf16-sdpa", "bf16 + SDPA", "denoiser", {"dtype": "bf16", "attention": "sdpa"}),
    Row("fast", "bf16 + SDPA + fused QKV + channels_last", "denoiser", FAST),
    Row("fast-compile", "fast + torch.compile UNet and VAE decoder", "denoiser", FAST_COMPILED),
    Row("fast-compile-tiny", "fast + torch.compile + tiny VAE", "denoiser", {**FAST_COMPILED, "vae": "tiny"}),
    # The last step of "Diffusion, Fast": dynamic quantization of the linear layers (int8 there; fp8 on Hopper).
    Row("fast-compile-tiny-fp8", "fast + torch.compile + tiny VAE + fp8 linears (torchao)", "denoiser",
        {**FAST_COMPILED, "vae": "tiny", "quantize": "fp8"}),
    Row("fast-compile-tiny-int8", "fast + torch.compile + tiny VAE + int8 linears (torchao)", "denoiser",
        {**FAST_COMPILED, "vae": "tiny", "quantize": "int8"}),
    Row("fast-autotune", "fast + torch.compile max-autotune (Diffusion, Fast minus int8)", "denoiser",
        {**FAST_COMPILED, "compile_mode": "max-autotune"}),
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
    """--rows: 'all' (the catalogue's order) or a comma list of row ids, run in the order given, so that under
    a --budget the rows that matter most run first."""
    if text.strip() in ("", "all"):
        return ROWS
    wanted = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in wanted if name not in ROW_BY_ID]
    if unknown:
        raise UserError(f"unknown row {unknown[0]!r} in --rows; rows are: {', '.join(ROW_BY_ID)}")
    return tuple(ROW_BY_ID[name] for name in wanted)


def parse_row_values(pairs: tuple[str, ...], flag: str) -> dict[str, int]:
    """--row-steps / --row-repeats: ROW=N pairs naming known rows, N >= 1."""
    values: dict[str, int] = {}
    for pair in pairs:
        name, _, number = pair.partition("=")
        name = name.strip()
        if name not in ROW_BY_ID:
            raise UserError(f"{flag} {pair!r}: unknown row {name!r}; rows are: {', '.join(ROW_BY_ID)}")
        try:
            values[name] = int(number)
        except ValueError:
            raise UserError(f"{flag} {pair!r} must look like ROW=N, e.g. {name}=5") from None
        if values[name] < 1:
            raise UserError(f"{flag} {pair!r}: N must be at least 1")
    return values


def plan_row(row: Row, base: RenderConfig, cuda_available: bool, steps: int | None = None) -> PlannedRow:
    """Apply the row's settings to `base`. The rows stay fixed; what this device cannot run is skipped, with
    validate()'s own reason, and half precision on the CPU runs in fp32 (it is ~18x slower there, so its
    timings would only measure the CPU's lack of fp16 kernels). `steps` shortens a row that would not fit a
    time budget; its per-step figures still compare."""
    if row.side == "encoder":
        return PlannedRow(row, None)
    overrides = dict(row.overrides)
    notes = []
    asked = overrides.get("dtype", base.dtype)
    if base.device == "cpu" and asked != "fp32":
        notes.append(f"fp32 on cpu (row is {asked})")
        overrides["dtype"] = "fp32"
    if steps is not None and steps != base.steps:
        notes.append(f"{steps} of {base.steps} steps, to fit the time budget")
        overrides["steps"] = steps
    note = "; ".join(notes)
    config = replace(base, **overrides)
    try:
        validate(config, cuda_available)
    except UserError as err:
        return PlannedRow(row, config, note, skip_reason=str(err))
    return PlannedRow(row, config, note)
