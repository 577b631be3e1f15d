"""Every denoiser path on a real CUDA GPU: offload modes, compile, half precision, the VAE upcast and memory columns.

The full-size checks run on the `sdxl-random` architecture (random weights: memory and FLOPs are real, images are
noise) at 512x512 and a few steps, so the whole file takes a couple of minutes on an H100. `SDXL_SPLIT_GPU_MODEL`
names an already built folder (the GPU suite builds one on the GPU); without it the model is built here.
Measured figures go to the junit XML as properties (`--junitxml`), where the GPU suite reads them.
"""

from __future__ import annotations

import gc
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_split.denoiser_service.config import DEFAULT_OFFLOAD_GROUP_MIB, RenderConfig
from sdxl_split.denoiser_service.denoise import generators
from sdxl_split.denoiser_service.pipeline import build_denoiser
from sdxl_split.encoder_service.text_side import TextSide
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.loading import load_partial_pipeline
from sdxl_split.shared.models.resolve import ModelSource, resolve_model
from sdxl_split.shared.prompts import PromptEntry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = "a photo of an astronaut riding a horse on mars"
SMALL = RenderConfig(device="cuda", dtype="fp16", width=512, height=512, steps=3, images_per_prompt=1, seed=7)


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


@pytest.fixture(scope="module")
def full_model(tmp_path_factory) -> ModelSource:
    given = os.environ.get("SDXL_SPLIT_GPU_MODEL")
    if given:
        return resolve_model(given, Path(given).parent)
    from sdxl_split.shared.models.architectures import ARCHITECTURES
    from sdxl_split.shared.models.builder import build_model

    cache = tmp_path_factory.mktemp("gpu-cache")
    build_model(ARCHITECTURES["sdxl-random"], cache / "models" / "sdxl-random", device="cuda")
    return resolve_model("sdxl-random", cache)


def encode_on_gpu(source: ModelSource, prompt: str, dtype: str) -> Embeddings:
    """What `encode --device cuda --encoder-dtype fp16` produces, in process."""
    entry = PromptEntry(line=1, prompt=prompt)
    text_side = TextSide(source, "cuda", dtype)
    try:
        encoded = text_side.encode([entry], clip_skip=None)[0]
    finally:
        del text_side
        _free_gpu()
    settings = EncodingSettings(fingerprint="gpu-test", clip_skip=None, dtype=dtype, force_zeros=True)
    return Embeddings(key="0" * 64, texts=entry.texts(), settings=settings, tensors=encoded.tensors)


@pytest.fixture(scope="module")
def record(full_model: ModelSource) -> Embeddings:
    return encode_on_gpu(full_model, PROMPT, "fp16")


def render(source: ModelSource, config: RenderConfig, record: Embeddings) -> tuple[list[np.ndarray], dict]:
    """Load, render one job and unload, in this process; returns the images and the meter's summary."""
    _free_gpu()
    meter = MemoryMeter(cuda_device=0)
    try:
        denoiser = build_denoiser(source, config, meter)
        decoded = denoiser.render(record, config.seed, config.images_per_prompt)
        del denoiser
        return [np.array(image) for image in decoded.images], meter.summary()
    finally:
        meter.close()
        _free_gpu()


def test_each_offload_mode_renders_and_their_peaks_keep_their_order(full_model, record, record_property) -> None:
    peaks, denoise_peaks, pixels = {}, {}, {}
    for mode in ("none", "model", "group", "sequential"):
        images, memory = render(full_model, replace(SMALL, offload=mode), record)
        assert len(images) == 1 and images[0].shape == (512, 512, 3)
        pixels[mode] = images[0].astype(np.int16)
        peaks[mode] = memory["cuda_allocated_gib"]
        denoise_peaks[mode] = next(p["cuda_allocated_gib"] for p in memory["phases"] if p["phase"] == "denoise")
        record_property(f"offload_{mode}_peak_allocated_gib", round(peaks[mode], 3))
        record_property(f"offload_{mode}_denoise_peak_allocated_gib", round(denoise_peaks[mode], 3))
    # Group offload holds a block or two (<= 128 MiB each) where sequential offload holds one layer, so the order
    # shows while the UNet runs; over the whole render both peak in the same VAE decode and may tie.
    assert denoise_peaks["sequential"] < denoise_peaks["group"] < denoise_peaks["model"] < denoise_peaks["none"], (
        denoise_peaks)
    assert peaks["sequential"] <= peaks["group"] < peaks["model"] < peaks["none"], peaks
    # The same kernels on the same weights: an upload raced by the compute would show as noise, not as a level.
    for mode in ("model", "group", "sequential"):
        diff = int(np.abs(pixels[mode] - pixels["none"]).max())
        record_property(f"offload_{mode}_vs_none_max_abs_pixel_diff", diff)
        assert diff <= 1, f"--offload {mode} changed the image by up to {diff}/255"


def test_group_offload_sizes_trade_memory_for_uploads(full_model, record, record_property) -> None:
    """Each layer a group (--offload-group-mib 0) holds the least; the default block-sized groups hold at most
    three groups more while the UNet runs: one computing, the next uploading, and the last one, which the
    allocator releases only once the compute stream is past it (record_stream)."""
    denoise = {}
    for mib in (0, None):
        _, memory = render(full_model, replace(SMALL, offload="group", offload_group_mib=mib), record)
        denoise[mib] = next(p["cuda_allocated_gib"] for p in memory["phases"] if p["phase"] == "denoise")
        record_property(f"group_offload_mib_{mib or 'default'}_denoise_peak_allocated_gib", round(denoise[mib], 3))
    assert denoise[0] <= denoise[None] <= denoise[0] + 3 * DEFAULT_OFFLOAD_GROUP_MIB / 1024, denoise


def test_a_unet_batch_cap_holds_under_group_offload(full_model, record, record_property) -> None:
    """The offload hooks wrap the batch loop; applied the other way round the cap was lost after the first call."""
    rows: list[int] = []
    config = replace(SMALL, offload="group", unet_batch=1)
    meter = MemoryMeter(cuda_device=0)
    denoiser = build_denoiser(full_model, config, meter)
    denoiser.pipe.unet.conv_in.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        denoiser.render(record, config.seed, 1)
    finally:
        meter.close()
        del denoiser
        _free_gpu()
    record_property("group_offload_unet_batch_1_rows_per_call", ",".join(map(str, rows)))
    assert rows == [1, 1] * SMALL.steps, rows


def test_fused_qkv_costs_no_memory(full_model, record_property) -> None:
    """diffusers keeps the unfused q/k/v next to the fused ones (1.2 GiB in SDXL's UNet); ours drops them."""
    loaded = {}
    for fused in (False, True):
        _free_gpu()
        meter = MemoryMeter()
        denoiser = build_denoiser(full_model, replace(SMALL, dtype="bf16", fuse_qkv=fused), meter)
        meter.close()
        torch.cuda.synchronize()
        loaded[fused] = torch.cuda.memory_allocated() / 2**30
        del denoiser
        _free_gpu()
    record_property("fused_qkv_extra_loaded_gib", round(loaded[True] - loaded[False], 3))
    assert loaded[True] <= loaded[False] + 0.01, loaded


def test_compile_renders_two_jobs_of_one_size_with_one_compilation(tiny_dir: Path, record_property) -> None:
    from torch._dynamo.utils import counters

    source = resolve_model(str(tiny_dir), tiny_dir.parent.parent)
    config = RenderConfig(device="cuda", dtype="fp16", width=128, height=128, steps=2, compile=True,
                          compile_vae=True, channels_last=True, fuse_qkv=True)
    records = [encode_on_gpu(source, prompt, "fp16") for prompt in ("a red bicycle", "a lighthouse at dusk")]
    torch._dynamo.reset()
    counters.clear()
    meter = MemoryMeter(cuda_device=0)
    try:
        denoiser = build_denoiser(source, config, meter)
        denoiser.render(records[0], seed=1, count=1)
        after_first = counters["stats"]["unique_graphs"]
        images = denoiser.render(records[1], seed=2, count=1).images
    finally:
        meter.close()
    after_second = counters["stats"]["unique_graphs"]
    record_property("compile_graphs_first_job", after_first)
    record_property("compile_graphs_second_job", after_second - after_first)
    assert after_first >= 1, "nothing was compiled"
    assert after_second == after_first, f"the second job of the same size recompiled: {dict(counters['recompiles'])}"
    assert np.isfinite(np.array(images[0], dtype=np.float32)).all()


def test_fp16_decode_upcasts_the_sdxl_vae_and_retries_overflow_in_fp32(full_model, record_property) -> None:
    denoiser = build_denoiser(full_model, SMALL, MemoryMeter())
    pipe = denoiser.pipe
    try:
        assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float16
        latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to("cuda", torch.float16)
        upcast = denoiser.decode(latents)
        pixels = np.array(upcast.images[0], dtype=np.float32)
        assert not upcast.retried_fp32 and pixels.shape == (512, 512, 3) and pipe.vae.dtype == torch.float16
        # A VAE that trusts fp16 (no force_upcast) and latents that overflow it: the decode is redone in fp32.
        pipe.vae.register_to_config(force_upcast=False)
        huge = (latents.float() * 3e4).clamp(-6e4, 6e4).half()
        retried = denoiser.decode(huge)
        assert retried.retried_fp32 and pipe.vae.dtype == torch.float16
        record_property("fp16_overflow_retried_in_fp32", True)
    finally:
        denoiser.meter.close()
        del pipe, denoiser
        _free_gpu()


def test_memory_columns_are_filled_on_cuda(full_model, record, record_property) -> None:
    _, memory = render(full_model, SMALL, record)
    assert memory["cuda_allocated_gib"] > 4.0  # at least the fp16 UNet's 4.78 GiB of weights
    assert memory["cuda_reserved_gib"] >= memory["cuda_allocated_gib"]
    assert memory["nvml_gib"] is not None and memory["nvml_gib"] >= memory["cuda_reserved_gib"]
    phases = {p["phase"]: p for p in memory["phases"]}
    assert set(phases) == {"load", "denoise", "decode"}
    assert all(p["cuda_allocated_gib"] > 0 and p["cuda_reserved_gib"] > 0 for p in phases.values())
    for key in ("cuda_allocated_gib", "cuda_reserved_gib", "nvml_gib"):
        record_property(key, round(memory[key], 3))
    record_property("nvml_scope", memory.get("nvml_scope"))


def test_split_matches_the_monolith_on_the_gpu_in_fp16(full_model, record, record_property) -> None:
    ours, _ = render(full_model, SMALL, record)
    pipe = load_partial_pipeline(full_model, {}, torch.float16, add_watermarker=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.inference_mode():
            theirs = pipe(prompt=PROMPT, num_images_per_prompt=1, generator=generators(SMALL.seed, 1),
                          height=SMALL.height, width=SMALL.width, num_inference_steps=SMALL.steps,
                          guidance_scale=SMALL.guidance).images
    finally:
        del pipe
        _free_gpu()
    diff = int(np.abs(ours[0].astype(np.int16) - np.array(theirs[0]).astype(np.int16)).max())
    record_property("split_vs_monolith_max_abs_pixel_diff", diff)
    assert diff <= 1, f"split and monolith differ by up to {diff}/255 (target 0, limit 1/255)"


def test_bf16_and_the_fast_eager_options_render(full_model, record, record_property) -> None:
    baseline, _ = render(full_model, replace(SMALL, dtype="bf16"), record)
    fast, _ = render(full_model, replace(SMALL, dtype="bf16", channels_last=True, fuse_qkv=True), record)
    for images in (baseline, fast):
        assert images[0].shape == (512, 512, 3) and images[0].std() > 0
    record_property("fast_vs_bf16_max_abs_pixel_diff",
                    int(np.abs(baseline[0].astype(np.int16) - fast[0].astype(np.int16)).max()))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 needs compute capability 8.9+ (Ada, Hopper)")
def test_fp8_quantized_linears_render(full_model, record, record_property) -> None:
    pytest.importorskip("torchao", reason="--quantize needs torchao (the suite installs it from .whl)")
    plain, _ = render(full_model, replace(SMALL, dtype="bf16"), record)
    quantized, memory = render(full_model, replace(SMALL, dtype="bf16", quantize="fp8"), record)
    pixels = quantized[0].astype(np.int16)
    assert pixels.shape == (512, 512, 3) and pixels.std() > 0
    diff = np.abs(pixels - plain[0].astype(np.int16))
    record_property("fp8_vs_bf16_mean_abs_pixel_diff", round(float(diff.mean()), 3))
    record_property("fp8_vs_bf16_max_abs_pixel_diff", int(diff.max()))
    record_property("fp8_loaded_gib", round(next(p["cuda_allocated_gib"] for p in memory["phases"]
                                                 if p["phase"] == "load"), 3))
    assert diff.mean() > 0, "the fp8 render is identical to bf16: nothing was quantized"
