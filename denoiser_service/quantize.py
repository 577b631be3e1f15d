"""--quantize: torchao's dynamic quantization of the UNet's linear layers, the last step of PyTorch's "Diffusion,
Fast" recipe (int8 on an A100), or fp8 where the GPU has fp8 tensor cores (Ada, Hopper).

Weights are quantized once; each activation is quantized as it arrives (per row), so a matmul runs on int8 or
fp8 tensor cores at twice the bf16 rate. Under --compile the activation scaling fuses into the op before it.
Convolutions, attention itself and the VAE keep --dtype.
"""

from __future__ import annotations

import torch

from sdxl_split.denoiser_service.config import FP8_NEEDS_GPU
from sdxl_split.shared.errors import UserError

# Linears that see one row per image (time and size embeddings) or the 77 text tokens (cross-attention's k and v):
# quantizing their few activation rows costs more than the faster matmul saves.
SMALL_INPUT_LAYERS = ("time_embedding.", "add_embedding.", "time_emb_proj", "attn2.to_k", "attn2.to_v",
                      "attn2.to_kv")


def quantizable(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not any(part in f"{name}." for part in SMALL_INPUT_LAYERS)


def _config(scheme: str):
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
        )
    except ImportError:
        raise UserError(f"--quantize {scheme} needs torchao; install it with pip install 'sdxl-split[quant]'") \
            from None
    # set_inductor_config=False: torchao would otherwise turn on inductor's coordinate-descent tuning for the whole
    # process, which multiplies compile time (already ~90 s for the UNet) and would make a quantized row differ
    # from its unquantized twin in more than the quantization.
    if scheme == "int8":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def check_fp8_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise UserError(FP8_NEEDS_GPU)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"--quantize fp8 needs fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
                        f"{torch.cuda.get_device_name(device)} is {major}.{minor}; use --quantize int8")


def quantize_unet(unet: torch.nn.Module, scheme: str) -> None:
    """Quantize the UNet's linear layers in place, where its weights are."""
    if scheme == "fp8":
        check_fp8_device(next(unet.parameters()).device)
    config = _config(scheme)
    from torchao.quantization import quantize_

    quantize_(unet, config, filter_fn=quantizable)
