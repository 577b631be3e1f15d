"""Component configs for the SDXL base 1.0 architecture and for the tiny test model built on the same shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Written into every folder we generate, so loaders can say "random weights" and which architecture.
MARKER_FILE = "sdxl_split_model.json"
# The tiny VAE sits beside the pipeline's components but outside model_index.json, so that
# `StableDiffusionXLPipeline.from_pretrained(dir)` loads exactly what a real SDXL folder holds.
TINY_VAE_SUBFOLDER = "vae_tiny"

# Published configs of stabilityai/stable-diffusion-xl-base-1.0 (the parts that change the graph).
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SDXL_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# madebyollin/taesdxl: the SDXL tiny autoencoder (diffusers' AutoencoderTiny defaults).
SDXL_TAESD: dict[str, Any] = {
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}

_CLIP_COMMON: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "pad_token_id": 1,
    "vocab_size": 49408,
}

# CLIP ViT-L/14 text tower.
SDXL_TEXT_ENCODER: dict[str, Any] = {
    **_CLIP_COMMON,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

# OpenCLIP ViT-bigG/14 text tower, with its 1280-wide projection.
SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    **_CLIP_COMMON,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

SDXL_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# The tiny model keeps every structural feature SDXL has (two encoders of different widths,
# text_time conditioning, an 8x VAE) at sizes that run a whole image in well under a second on a CPU.
_TINY_TE1 = 32
_TINY_TE2 = 64
_TINY_TIME_DIM = 8

TINY_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "addition_embed_type_num_heads": 4,
    "addition_time_embed_dim": _TINY_TIME_DIM,
    "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64],
    "cross_attention_dim": _TINY_TE1 + _TINY_TE2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    # SDXL's add_time_ids are six numbers (original size, crop corner, target size).
    "projection_class_embeddings_input_dim": 6 * _TINY_TIME_DIM + _TINY_TE2,
    "sample_size": 8,
    "transformer_layers_per_block": [1, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}

TINY_VAE: dict[str, Any] = {
    **SDXL_VAE,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}

TINY_TAESD: dict[str, Any] = {
    **SDXL_TAESD,
    "decoder_block_out_channels": [8, 8, 8, 8],
    "encoder_block_out_channels": [8, 8, 8, 8],
    "num_decoder_blocks": [1, 1, 1, 1],
    "num_encoder_blocks": [1, 1, 1, 1],
}

TINY_TEXT_ENCODER: dict[str, Any] = {
    **SDXL_TEXT_ENCODER,
    "hidden_size": _TINY_TE1,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    # Four layers leave room for --clip-skip 2, which reads hidden_states[-4].
    "num_hidden_layers": 4,
    "projection_dim": _TINY_TE1,
}

TINY_TEXT_ENCODER_2: dict[str, Any] = {
    **SDXL_TEXT_ENCODER_2,
    "hidden_size": _TINY_TE2,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "projection_dim": _TINY_TE2,
}


# Which halves a built-in test LoRA covers (`model init tiny-lora --only`).
LORA_PARTS = ("both", "unet", "text")

@dataclass(frozen=True)
class Architecture:
    """Everything needed to instantiate one SDXL-shaped model from scratch."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    taesd: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SDXL_SCHEDULER))
    random_weights: bool = True
    # torch dtype name of the weights on disk: fp32 for CPU tests, fp16 like the hub's fp16 variant.
    weights_dtype: str = "float32"


TINY = Architecture("tiny", TINY_UNET, TINY_VAE, TINY_TAESD, TINY_TEXT_ENCODER, TINY_TEXT_ENCODER_2)
SDXL_BASE = Architecture(
    "sdxl-random", SDXL_UNET, SDXL_VAE, SDXL_TAESD, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, weights_dtype="float16"
)
ARCHITECTURES = {arch.name: arch for arch in (TINY, SDXL_BASE)}
