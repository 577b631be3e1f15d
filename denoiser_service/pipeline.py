"""Loads the denoising half (UNet, scheduler, full or tiny VAE) and applies the seed's optimizations to it."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderTiny, StableDiffusionXLPipeline

from sdxl_split.denoiser_service.config import DEFAULT_TAESDXL, RenderConfig
from sdxl_split.denoiser_service.denoise import Denoiser, needs_fp32_decode, use_scheduler  # noqa: F401
from sdxl_split.denoiser_service.fused_projections import fuse_projections
from sdxl_split.denoiser_service.lora_bank import LoraBank
from sdxl_split.denoiser_service.offload_groups import apply_sized_group_offload
from sdxl_split.denoiser_service.quantize import quantize_unet
from sdxl_split.denoiser_service.unet_batch import limit_unet_batch
from sdxl_split.shared.embeddings import DTYPES
from sdxl_split.shared.errors import ModelNotFoundError, first_line
from sdxl_split.shared.loras import LoraFinder, LoraUse
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.builder import TINY_VAE_SUBFOLDER
from sdxl_split.shared.models.loading import DENOISE_ONLY, load_partial_pipeline
from sdxl_split.shared.models.resolve import ModelSource


def tiny_vae_location(source: ModelSource, config: RenderConfig) -> str:
    """--vae-model if given; else the model's own vae_tiny/ (built-in models carry one); else taesdxl."""
    if config.vae_model:
        return config.vae_model
    if source.config_dir is not None and (source.config_dir / TINY_VAE_SUBFOLDER / "config.json").is_file():
        return str(source.config_dir / TINY_VAE_SUBFOLDER)
    return DEFAULT_TAESDXL


def load_tiny_vae(location: str, dtype: torch.dtype) -> AutoencoderTiny:
    try:
        return AutoencoderTiny.from_pretrained(location, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        if not Path(location).exists():
            # diffusers says the repo "does not appear to have a file named config.json", which reads like a
            # broken repo; what it means offline is that the download never happened.
            raise ModelNotFoundError(
                f"the tiny VAE '{location}' is neither on disk (not in the Hugging Face cache) nor reachable on the "
                "hub; fetch it once with network, or pass --vae-model PATH to a local AutoencoderTiny folder, or "
                "use --vae full") from None
        first = first_line(err)
        raise ModelNotFoundError(
            f"cannot load the tiny VAE '{location}' ({first}); pass --vae-model PATH to a local AutoencoderTiny "
            "folder, or use --vae full"
        ) from None


def configure_tiling(vae: torch.nn.Module, tile_px: int) -> None:
    """Tile at `tile_px`: diffusers' default tile is the VAE's sample_size (1024 for SDXL), so a 1024^2 decode
    would otherwise run as a single tile and save nothing."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    scale = getattr(vae, "spatial_scale_factor", None) or 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_latent_min_size = tile_px // scale


def load_weights(source: ModelSource, config: RenderConfig) -> StableDiffusionXLPipeline:
    """UNet, VAE and scheduler as --dtype and --attention ask, still on the CPU and unchanged otherwise: the point
    where LoRAs can be fused into the weights (see `place`)."""
    dtype = DTYPES[config.dtype]
    extra = {}
    if config.vae == "tiny":
        # Passing the tiny VAE in means the full VAE's weights are never read.
        extra["vae"] = load_tiny_vae(tiny_vae_location(source, config), dtype)
    pipe = load_partial_pipeline(source, DENOISE_ONLY, dtype, add_watermarker=False, **extra)
    use_scheduler(pipe, config.scheduler)
    if config.attention == "default":
        pipe.unet.set_default_attn_processor()
        if hasattr(pipe.vae, "set_default_attn_processor"):
            pipe.vae.set_default_attn_processor()
    return pipe


def place(pipe: StableDiffusionXLPipeline, config: RenderConfig) -> StableDiffusionXLPipeline:
    """Apply the rest of the options, in this order: fused projections, channels_last, VAE slicing or tiling, the
    UNet batch limit, the device or an offload, quantization, compilation. Each of these copies or wraps the
    weights, so a LoRA fused after them would not reach what runs."""
    if config.fuse_qkv:
        # Before offload hooks wrap the modules; the tiny VAE has no attention to fuse.
        fuse_projections(pipe, vae=config.vae == "full")
    if config.channels_last:
        # Before any offload pins its copies of the weights, so that the copies are NHWC too.
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if config.vae_slicing:
        pipe.vae.enable_slicing()
    if config.vae_tiling:
        configure_tiling(pipe.vae, config.vae_tile_size)
    if config.unet_batch is not None:
        # Before any offload: its hooks then wrap the batch loop. Applied after them, the loop was lost when group
        # offload's first forward removed its tracing hook (diffusers restores the forward it saw then).
        limit_unet_batch(pipe.unet, config.unet_batch)
    device = torch.device(config.device)
    if config.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif config.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif config.offload == "group":
        if needs_fp32_decode(pipe.vae):
            # Group offload uploads the copies it pinned at setup, so a later vae.to(float32) never reaches
            # the GPU: upcast once, before the copies are made.
            pipe.vae.to(torch.float32)
        apply_sized_group_offload(pipe.unet, device, config.offload_group_bytes())
        # The VAE runs once per image, so its ~250 layers may each be a group (diffusers' leaf level).
        # record_stream: without it every layer's offload waits for the GPU to finish (a full device sync per
        # layer), so the CPU can never run ahead to queue the next upload.
        pipe.vae.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                      offload_type="leaf_level", use_stream=True, non_blocking=True,
                                      record_stream=True)
    else:
        pipe.to(device)
    if config.quantize != "none":
        # On the device, where the per-row scales are computed fast; before compile, which fuses the activations'
        # quantization into the op before each matmul.
        quantize_unet(pipe.unet, config.quantize)
    if config.compile or config.compile_vae:
        compile_modules(pipe, config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_denoiser(source: ModelSource, config: RenderConfig, meter: MemoryMeter, lora_finder: LoraFinder | None = None,
                   lora_cache: int = 8, fuse: tuple[LoraUse, ...] = ()) -> Denoiser:
    """What every denoiser runs (the service, the bench, the tests): the weights loaded, a fixed LoRA set fused into
    them (--fuse-lora) before anything copies them, then placed. With a `lora_finder`, jobs may bring LoRAs."""
    with meter.phase("load"):
        pipe = load_weights(source, config)
        bank = LoraBank(pipe, lora_finder, lora_cache) if lora_finder is not None else None
        if fuse and bank is not None:
            bank.fuse(fuse)
        place(pipe, config)
    return Denoiser(pipe, config, meter, loras=bank)


def compile_modules(pipe: StableDiffusionXLPipeline, config: RenderConfig) -> None:
    mode = None if config.compile_mode == "default" else config.compile_mode
    if config.channels_last:
        # With NHWC activations inductor can lower the UNet's many 1x1 convolutions to plain matmuls
        # (PyTorch's "Diffusion, Fast" recipe).
        torch._inductor.config.conv_1x1_as_mm = True
    if config.compile:
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    if config.compile_vae:
        # The decoder alone (the denoiser never encodes images); the wrapper keeps its parameters, so the
        # fp32 upcast around each decode still reaches them.
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=mode, fullgraph=True)
