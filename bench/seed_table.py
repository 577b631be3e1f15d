"""The seed's own figures: the conclusion table of "Exploring simple optimizations for SDXL" (A100 40 GB)."""

from __future__ import annotations

from dataclasses import dataclass

SEED_GPU = "A100 40GB"
SEED_WORKLOAD = "1024x1024, 25 steps, 4 images per prompt, last of 3 runs"
# Every seed row but one kept both text encoders in the same process as the UNet and VAE.
SEED_NOTE = ("seed: one process with both text encoders except 'precomputed text embeddings'; its 'GB' is "
             "max_memory_allocated / 1024**3 (GiB); its Tiny Autoencoder row loaded taesd (SD1.x), ours taesdxl")


@dataclass(frozen=True)
class SeedFigure:
    technique: str
    memory_gib: float
    latency_ms: float


SEED_FIGURES: tuple[SeedFigure, ...] = (
    SeedFigure("unoptimized pipeline", 28.09, 72200.5),
    SeedFigure("fp16", 21.72, 14800.9),
    SeedFigure("fp16 + SDPA (default)", 21.72, 11413.0),
    SeedFigure("default + torch.compile", 21.73, 10296.7),
    SeedFigure("default + model CPU offload", 20.21, 16082.2),
    SeedFigure("default + sequential CPU offload", 19.91, 67034.0),
    SeedFigure("default + VAE slicing", 15.40, 11232.2),
    SeedFigure("default + VAE slicing + sequential CPU offload", 11.47, 66869.2),
    SeedFigure("default + precomputed text embeddings", 21.85, 11909.0),
    SeedFigure("default + Tiny Autoencoder", 15.48, 10449.7),
)
SEED_BY_TECHNIQUE = {figure.technique: figure for figure in SEED_FIGURES}
