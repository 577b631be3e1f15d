"""Deterministic random add-ons for the tiny model: a LoRA covering both text encoders and the UNet (or one half),
and an SDXL textual inversion. Same seed, same bytes; for tests and offline trials (their effect is noise)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from sdxl_split.shared.atomic import atomic_write_bytes
from sdxl_split.shared.models.architectures import TINY

_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linears(module: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, int, int]]:
    found = []
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.Linear) and name.endswith(targets):
            found.append((name, child.in_features, child.out_features))
    return found


def tiny_lora(parts: str = "both", rank: int = 4, seed: int = 0) -> bytes:
    """A LoRA in diffusers/PEFT format (`<component>.<module>.lora_A/B.weight`) for the tiny model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        components = []
        if parts in ("both", "text"):
            components += [("text_encoder", CLIPTextModel(CLIPTextConfig(**TINY.text_encoder)), _TEXT_TARGETS),
                           ("text_encoder_2", CLIPTextModelWithProjection(CLIPTextConfig(**TINY.text_encoder_2)),
                            _TEXT_TARGETS)]
        if parts in ("both", "unet"):
            components.append(("unet", UNet2DConditionModel(**TINY.unet), _UNET_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, module, targets in components:
        for name, fan_in, fan_out in _linears(module, targets):
            if prefix.startswith("text_encoder") and not name.startswith("text_model."):
                name = f"text_model.{name}"  # the layout LoRA files use; diffusers maps it either way
            tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.2
            tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.2
    return save(dict(sorted(tensors.items())))


def tiny_embedding(vectors: int = 2, seed: int = 0) -> bytes:
    """An SDXL textual inversion for the tiny model: `clip_l` and `clip_g` vectors."""
    generator = torch.Generator().manual_seed(seed)
    return save({"clip_g": torch.randn(vectors, TINY.text_encoder_2["hidden_size"], generator=generator) * 0.1,
                 "clip_l": torch.randn(vectors, TINY.text_encoder["hidden_size"], generator=generator) * 0.1})


def write_asset(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
