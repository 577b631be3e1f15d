"""The physical floor for a bench workload: SDXL UNet FLOPs against the GPU's dense bf16 matmul rate."""

from __future__ import annotations

from sdxl_split.bench.results import workload_ms
from sdxl_split.bench.seed_table import SEED_FIGURES

# One SDXL base UNet pass for one image at 1024x1024, attention included (counted with torch's FLOP counter).
UNET_TFLOP_PER_IMAGE_1024 = 6.76
# H100/H200: an 8192^3 bf16 matmul measured on the lent machines, and the datasheet's dense bf16 peak.
MEASURED_MATMUL_TFLOPS = 790.0
SPEC_TFLOPS = 989.0


def unet_tflop_per_step(base: dict, prompts: int) -> float:
    """UNet work of one denoising step for a whole repeat: each image twice under classifier-free guidance."""
    passes = 2 if base["guidance"] > 1 else 1
    return UNET_TFLOP_PER_IMAGE_1024 * base["images_per_prompt"] * passes * prompts


def reading(payload: dict) -> list[str]:
    """How the fastest finished row compares with the floor and with the seed's fastest figure; only for the
    seed's 1024x1024 size on a GPU, where the FLOP count holds."""
    base, env = payload["bench"]["base"], payload["environment"]
    if not env["device"].startswith("cuda") or (base["width"], base["height"]) != (1024, 1024):
        return []
    timed = [(workload_ms(r, base["steps"]), r) for r in payload["rows"] if r["side"] == "denoiser"]
    timed = [(ms, r) for ms, r in timed if ms is not None]
    if not timed:
        return []
    ms, best = min(timed, key=lambda pair: pair[0])
    per_step = unet_tflop_per_step(base, len(payload["bench"]["prompts"]))
    total = per_step * base["steps"]
    floor_s = total / MEASURED_MATMUL_TFLOPS
    lines = [
        "", "## Against the physical limit", "",
        f"- UNet work: {UNET_TFLOP_PER_IMAGE_1024} TFLOP per image per pass x {base['images_per_prompt']} images "
        f"x {'2 (CFG)' if base['guidance'] > 1 else '1'} x {base['steps']} steps = {total:,.0f} TFLOP per repeat; "
        f"at {MEASURED_MATMUL_TFLOPS:.0f} TFLOP/s (a large bf16 matmul on this box) that is {floor_s:.2f} s, "
        f"{total / SPEC_TFLOPS:.2f} s at the {SPEC_TFLOPS:.0f} TFLOP/s datasheet peak",
        f"- fastest row `{best['row']}`: {ms / 1000:.2f} s per repeat, decode included = "
        f"{total / (ms / 1000):,.0f} TFLOP/s, {ms / 1000 / floor_s:.2f}x the floor",
    ]
    if best.get("denoise_ms_per_step"):
        unet_rate = per_step / (best["denoise_ms_per_step"] / 1000)
        lines.append(f"- its denoising alone: {best['denoise_ms_per_step']:.1f} ms per step = {unet_rate:,.0f} "
                     f"TFLOP/s ({unet_rate / MEASURED_MATMUL_TFLOPS:.0%} of the matmul rate, "
                     f"{unet_rate / SPEC_TFLOPS:.0%} of the datasheet peak)")
    seed_best = min(SEED_FIGURES, key=lambda figure: figure.latency_ms)
    lines.append(f"- the seed's fastest figure, '{seed_best.technique}' on an A100 40GB, is "
                 f"{seed_best.latency_ms / 1000:.2f} s: {seed_best.latency_ms / ms:.1f}x ours")
    return lines
