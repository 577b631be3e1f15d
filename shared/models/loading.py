"""Loads half of an SDXL pipeline: the text side for the encoder, the denoising side for the denoiser."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import SingleFileComponentError

from sdxl_split.shared.errors import UserError, first_line
from sdxl_split.shared.models.resolve import ModelSource
from sdxl_split.shared.quiet import quiet_loaded

# Imported diffusers/transformers just now: their loading bars go off if the command asked (shared.quiet).
quiet_loaded()

TEXT_ONLY = {"unet": None, "vae": None, "scheduler": None}
DENOISE_ONLY = {"text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}


def load_partial_pipeline(
    source: ModelSource, skip: dict[str, None], dtype: torch.dtype, **extra: Any
) -> StableDiffusionXLPipeline:
    """Build diffusers' own SDXL pipeline with the other side's components set to None.

    Passing None makes diffusers skip loading those weights entirely, so each process holds only its
    half, while the code that turns embeddings into images stays diffusers' own.
    """
    kwargs: dict[str, Any] = {**skip, "torch_dtype": dtype, **extra}
    try:
        if source.kind == "single_file":
            return StableDiffusionXLPipeline.from_single_file(
                source.location, config=str(source.config_dir), local_files_only=True, **kwargs
            )
        if source.kind == "hub":
            return StableDiffusionXLPipeline.from_pretrained(source.location, revision=source.revision, **kwargs)
        return StableDiffusionXLPipeline.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as err:
        # diffusers' messages run to several lines of advice about its own API; the first says what broke.
        first = first_line(err, 200)
        raise UserError(f"cannot load SDXL components from {source.spec}: {first}; is it an SDXL model?") from None
