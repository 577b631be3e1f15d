"""The denoiser's settings: one frozen record built by the CLI, checked for impossible combinations up front."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

from sdxl_split.shared.errors import UserError
from sdxl_split.shared.image_settings import (
    batch_problem,
    guidance_problem,
    scheduler_problem,
    side_problem,
    steps_problem,
)
from sdxl_split.shared.prompts import seed_range_problem

ATTENTION = ("sdpa", "default")
VAE_KINDS = ("full", "tiny")
OFFLOAD = ("none", "model", "sequential", "group")
QUANTIZE = ("none", "int8", "fp8")
FP8_NEEDS_GPU = "--quantize fp8 needs a CUDA GPU with fp8 tensor cores (Ada or Hopper); on the CPU use --quantize int8"
DEFAULT_TAESDXL = "madebyollin/taesdxl"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# --offload group's largest group of UNet weights. SDXL's UNet then uploads one transformer block (66 MiB in fp16)
# or one ResNet block (up to 94 MiB) at a time: ~100 groups instead of ~790 layers, with at most ~200 MiB of
# weights on the GPU at once (the group computing and the next one uploading).
DEFAULT_OFFLOAD_GROUP_MIB = 128


@dataclass(frozen=True)
class RenderConfig:
    out_dir: Path = Path("images")
    device: str = "cpu"
    dtype: str = "fp32"
    attention: str = "sdpa"
    compile: bool = False
    compile_mode: str = "default"
    # Compile the VAE decoder too (with --compile's mode); the decode is a few % of a 25-step image.
    compile_vae: bool = False
    # NHWC weights and activations: the layout cuDNN's tensor-core convolutions prefer.
    channels_last: bool = False
    # One matmul for q, k and v (k and v for cross-attention) instead of three (diffusers' fuse_qkv_projections).
    fuse_qkv: bool = False
    vae: str = "full"
    vae_model: str | None = None
    vae_slicing: bool = False
    vae_tiling: bool = False
    vae_tile_size: int = 512
    offload: str = "none"
    # --offload group: most MiB of UNet weights per upload; 0 makes each layer its own group. None: the default.
    offload_group_mib: int | None = None
    # torchao dynamic quantization of the UNet's linear layers: none, int8 or fp8.
    quantize: str = "none"
    # Most rows per UNet call (guidance doubles the batch); None: the whole batch in one call.
    unet_batch: int | None = None
    steps: int = 25
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    images_per_prompt: int = 1
    seed: int = 0
    scheduler: str = "euler"

    def pixel_settings(self) -> dict:
        """The settings that decide an image's pixels; they go into every job id and file name."""
        return {
            "width": self.width, "height": self.height, "steps": self.steps, "guidance": self.guidance,
            "scheduler": self.scheduler, "vae": self.vae, "vae_model": self.vae_model, "dtype": self.dtype,
            # These change the last bits only, but a file name must never stand for two different images.
            "attention": self.attention, "vae_slicing": self.vae_slicing,
            "vae_tile_size": self.vae_tile_size if self.vae_tiling else None,
            "compile": self.compile_mode if self.compile else None,
            "compile_vae": self.compile_mode if self.compile_vae else None,
            "channels_last": self.channels_last, "fuse_qkv": self.fuse_qkv,
            # Only when set, so that the names of images rendered before the option existed stay the same.
            **({"unet_batch": self.unet_batch} if self.unet_batch is not None else {}),
            **({"quantize": self.quantize} if self.quantize != "none" else {}),
        }

    def offload_group_bytes(self) -> int:
        mib = DEFAULT_OFFLOAD_GROUP_MIB if self.offload_group_mib is None else self.offload_group_mib
        return mib * 2**20

    def as_dict(self) -> dict:
        return {**asdict(self), "out_dir": str(self.out_dir)}


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r} must look like 1024x1024 (WIDTHxHEIGHT)") from None
    return width, height


def validate(config: RenderConfig, cuda_available: bool) -> None:
    """Refuse combinations that cannot work, before any model is loaded."""
    check_image(config)
    _check_placement(config, cuda_available)


def check_image(config: RenderConfig) -> None:
    """The settings of the images themselves: size, batch, seeds, guidance, steps, scheduler (the bounds every
    source of them shares: shared.image_settings)."""
    if config.images_per_prompt < 1:
        raise UserError("--images-per-prompt must be at least 1")
    problems = (side_problem(config.width, "width"), side_problem(config.height, "height"),
                batch_problem(config.width, config.height, config.images_per_prompt),
                seed_range_problem(config.seed, config.images_per_prompt), guidance_problem(config.guidance),
                steps_problem(config.steps), scheduler_problem(config.scheduler))
    if problem := next((problem for problem in problems if problem), None):
        raise UserError(problem)


def _check_placement(config: RenderConfig, cuda_available: bool) -> None:
    """Where and how the model runs: device, offload, quantization, compilation, attention, VAE options."""
    on_gpu = config.device.startswith("cuda")
    if on_gpu and not cuda_available:
        raise UserError(f"--device {config.device} asked for CUDA, but torch sees no CUDA GPU; use --device cpu")
    if config.offload != "none" and not on_gpu:
        raise UserError(f"--offload {config.offload} moves weights between CPU and GPU, so it needs --device cuda")
    _check_quantize(config, on_gpu)
    if config.offload_group_mib is not None and config.offload != "group":
        raise UserError("--offload-group-mib sizes the groups of --offload group; add --offload group")
    compiling = config.compile or config.compile_vae
    if compiling and config.offload != "none":
        flag = "--compile" if config.compile else "--compile-vae"
        raise UserError(
            f"{flag} cannot be combined with --offload {config.offload}: offload hooks move weights during "
            "forward and break compiled graphs (diffusers #4399, accelerate #3885); pick one"
        )
    if compiling and config.compile_mode == "reduce-overhead" and not on_gpu:
        raise UserError("--compile-mode reduce-overhead uses CUDA graphs and needs --device cuda")
    if config.fuse_qkv and config.attention != "sdpa":
        raise UserError("--fuse-qkv runs diffusers' fused SDPA processor; it cannot be combined with "
                        "--attention default")
    if config.vae_model is not None and config.vae != "tiny":
        raise UserError("--vae-model names a tiny autoencoder; add --vae tiny")
    if config.vae_tiling and (config.vae_tile_size < 64 or config.vae_tile_size % 64):
        raise UserError("--vae-tile-size must be a multiple of 64 pixels")
    if config.unet_batch is not None and config.unet_batch < 1:
        raise UserError(f"--unet-batch {config.unet_batch} must be at least 1 (rows per UNet call)")


def _check_quantize(config: RenderConfig, on_gpu: bool) -> None:
    if config.quantize not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)}")
    if config.quantize != "none" and config.offload != "none":
        raise UserError(f"--quantize {config.quantize} cannot be combined with --offload {config.offload} yet: "
                        "the offload hooks copy plain tensors, not torchao's quantized ones; pick one")
    if config.quantize == "fp8" and not on_gpu:
        raise UserError(FP8_NEEDS_GPU)
    if config.quantize == "fp8" and config.dtype != "bf16":
        raise UserError(f"--quantize fp8 scales each row of a weight, which torchao does for bf16 weights only; "
                        f"add --dtype bf16 (not {config.dtype})")
    if config.quantize != "none" and importlib.util.find_spec("torchao") is None:
        raise UserError(f"--quantize {config.quantize} needs torchao; install it with pip install "
                        "'sdxl-split[quant]'")
