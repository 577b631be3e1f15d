"""The denoiser's options (`render`, `run` and `bench` take the same ones) and the frozen RenderConfig built
from them."""

from __future__ import annotations

from pathlib import Path

import click

from sdxl_split.cli.common import DTYPE_CHOICES, check_device, default_dtype
from sdxl_split.cli.options import apply_options
from sdxl_split.denoiser_service.config import (
    ATTENTION,
    COMPILE_MODES,
    DEFAULT_OFFLOAD_GROUP_MIB,
    OFFLOAD,
    QUANTIZE,
    VAE_KINDS,
    RenderConfig,
    check_image,
    parse_size,
    validate,
)
from sdxl_split.shared.devices import local_cuda_devices
from sdxl_split.shared.image_settings import SCHEDULERS
from sdxl_split.shared.prompts import MAX_SEED


def lora_serving_options(func):
    """How a denoiser holds the UNet halves of LoRAs."""
    return apply_options(func, [
        click.option("--lora-cache", type=click.IntRange(1, 256), default=8, show_default=True,
                     help="LoRA adapters kept loaded at once; the least recently used is dropped past this."),
        click.option("--fuse-lora", is_flag=True,
                     help="Fuse the --lora set into the UNet's weights (faster per step); jobs that need any "
                          "other set are refused, to go to another denoiser."),
    ])


def render_options(func):
    """The denoiser's knobs; `run` and `bench` take the same ones."""
    return apply_options(func, [
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("images"),
                     show_default=True, help="Output folder for PNGs and manifest.jsonl."),
        click.option("--device", default=None, help="cuda, cuda:N or cpu [default: cuda if present, else cpu]."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="UNet/VAE dtype [default: fp16 on GPU, fp32 on CPU]."),
        click.option("--attention", type=click.Choice(ATTENTION), default="sdpa", show_default=True,
                     help="sdpa = PyTorch scaled_dot_product_attention; default = the classic AttnProcessor."),
        click.option("--compile", "compile_unet", is_flag=True,
                     help="torch.compile the UNet (fullgraph). The first image compiles; a new size or batch "
                          "recompiles."),
        click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default="default", show_default=True,
                     help="torch.compile mode for --compile and --compile-vae; max-autotune searches GEMM kernels "
                          "for minutes on the first image, reduce-overhead adds CUDA graphs."),
        click.option("--compile-vae", is_flag=True, help="torch.compile the VAE decoder too."),
        click.option("--channels-last", is_flag=True,
                     help="NHWC memory layout for the UNet and VAE (faster convolutions on tensor-core GPUs)."),
        click.option("--fuse-qkv", is_flag=True,
                     help="Fuse each attention's q/k/v projections into one matmul (needs --attention sdpa)."),
        click.option("--vae", type=click.Choice(VAE_KINDS), default="full", show_default=True,
                     help="full = the model's AutoencoderKL; tiny = AutoencoderTiny (taesdxl), fast previews."),
        click.option("--vae-model", default=None,
                     help="Tiny VAE for --vae tiny [default: the model's vae_tiny/, else madebyollin/taesdxl]."),
        click.option("--vae-slicing", is_flag=True, help="Decode the batch one image at a time."),
        click.option("--vae-tiling", is_flag=True, help="Decode in overlapping tiles (see --vae-tile-size)."),
        click.option("--vae-tile-size", type=int, default=512, show_default=True, help="Tile size in pixels."),
        click.option("--offload", type=click.Choice(OFFLOAD), default="none", show_default=True,
                     help="CPU offload: model (whole models), sequential (every layer), group (blocks of at most "
                          "--offload-group-mib, the next one uploading on a side stream while this one computes)."),
        click.option("--quantize", type=click.Choice(QUANTIZE), default="none", show_default=True,
                     help="torchao dynamic quantization of the UNet's linear layers (pip install "
                          "'sdxl-split[quant]'): int8 (\"Diffusion, Fast\"), or fp8 on Ada/Hopper GPUs. Changes "
                          "the pixels a little; pair it with --compile, which fuses the activations' scaling."),
        click.option("--offload-group-mib", type=click.IntRange(0, 1 << 20), default=None,
                     help="With --offload group: most MiB of UNet weights per upload. Larger groups are faster and "
                          f"hold more GPU memory; 0 makes each layer a group [default: {DEFAULT_OFFLOAD_GROUP_MIB}, "
                          "one transformer or ResNet block of SDXL]."),
        click.option("--unet-batch", type=click.IntRange(1, 128), default=None,
                     help="Most rows per UNet call. Guidance doubles the batch (4 images = 8 rows); 4 runs the "
                          "two halves one after the other: half the UNet's activation memory, a few % slower; "
                          "pixels may differ in the last bits [default: the whole batch at once]."),
        click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True,
                     help="Denoising steps per image."),
        click.option("--guidance", type=float, default=5.0, show_default=True, help="Classifier-free guidance scale."),
        click.option("--size", default="1024x1024", show_default=True, help="WIDTHxHEIGHT, multiples of 8."),
        click.option("--images-per-prompt", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Images per prompt (a JSONL 'count' overrides it)."),
        click.option("--seed", type=click.IntRange(-1, MAX_SEED), default=0, show_default=True,
                     help="Image i of a prompt uses seed+i (a JSONL 'seed' overrides it); -1 draws a random seed "
                          "for each prompt, written to its PNGs and the manifest."),
        click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="euler", show_default=True),
        click.option("--metadata", type=click.Choice(["a1111", "full"]), default="a1111", show_default=True,
                     help="a1111: PNGs name the model as A1111 does (hub id, checkpoint stem or folder name, with "
                          "its AutoV2 hash); full: also the --model value itself, local paths included."),
    ])


def check_image_options(kw: dict) -> None:
    """The image settings (size, steps, guidance, seeds...), checked before anything starts: they need no device,
    so `run` refuses them at once instead of after its children have imported torch."""
    check_image(_config(kw, device="cpu"))


def render_config_from(kw: dict, remote: bool = False, cuda_devices: int | None = None) -> RenderConfig:
    """The frozen RenderConfig from render_options' values, refused before anything loads if it cannot work.
    `remote`: the denoisers run on other machines (Ray), so this one's lack of a GPU says nothing.
    `cuda_devices`: what torch sees here, if already known; otherwise torch is asked."""
    if cuda_devices is None:
        cuda_devices = local_cuda_devices()
    config = _config(kw, device=kw["device"] or ("cuda" if cuda_devices else "cpu"))
    validate(config, remote or cuda_devices > 0)
    if not config.device.startswith("cuda"):
        check_device(config.device)
    return config


def _config(kw: dict, device: str) -> RenderConfig:
    width, height = parse_size(kw["size"])
    return RenderConfig(
        out_dir=kw["out_dir"], device=device, dtype=default_dtype(device, kw["dtype"]), attention=kw["attention"],
        compile=kw["compile_unet"], compile_mode=kw["compile_mode"], compile_vae=kw["compile_vae"],
        channels_last=kw["channels_last"], fuse_qkv=kw["fuse_qkv"], vae=kw["vae"], vae_model=kw["vae_model"],
        vae_slicing=kw["vae_slicing"], vae_tiling=kw["vae_tiling"], vae_tile_size=kw["vae_tile_size"],
        offload=kw["offload"], offload_group_mib=kw["offload_group_mib"], unet_batch=kw["unet_batch"],
        quantize=kw["quantize"],
        steps=kw["steps"], guidance=kw["guidance"], width=width, height=height,
        images_per_prompt=kw["images_per_prompt"], seed=kw["seed"], scheduler=kw["scheduler"],
    )
