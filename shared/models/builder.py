"""Writes an SDXL-shaped diffusers folder with seeded random weights, laid out like the hub's SDXL base."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl_split.shared.models.architectures import MARKER_FILE, TINY_VAE_SUBFOLDER, Architecture
from sdxl_split.shared.models.clip_tokenizers import write_sdxl_tokenizers
from sdxl_split.shared.quiet import quiet_loaded

# Imported diffusers/transformers just now: their loading bars go off if the command asked (shared.quiet).
quiet_loaded()

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclass(frozen=True)
class BuildReport:
    directory: Path
    parameters: dict[str, int]
    bytes_on_disk: int
    seconds: float


def _text_config(config: dict, architecture_name: str) -> CLIPTextConfig:
    text_config = CLIPTextConfig(**config)
    text_config.architectures = [architecture_name]
    return text_config


def write_config_folder(arch: Architecture, directory: Path) -> None:
    """Configs and tokenizers only: what `from_single_file(config=...)` needs to run offline."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2, sort_keys=True) + "\n")
    with torch.device("meta"):
        UNet2DConditionModel(**arch.unet).save_config(directory / "unet")
        AutoencoderKL(**arch.vae).save_config(directory / "vae")
    EulerDiscreteScheduler.from_config(arch.scheduler).save_config(directory / "scheduler")
    _text_config(arch.text_encoder, "CLIPTextModel").save_pretrained(directory / "text_encoder")
    _text_config(arch.text_encoder_2, "CLIPTextModelWithProjection").save_pretrained(
        directory / "text_encoder_2"
    )
    write_sdxl_tokenizers(directory)


def _seeded(seed: int, factory: Callable[[], torch.nn.Module], dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Initialising 2.6B parameters is mostly random-number generation: seconds on a GPU, minutes on a small CPU.
    # The same seed draws different numbers on CUDA, so the marker records where the weights were drawn.
    with torch.device(device):
        module = factory()
    return module.to(device="cpu", dtype=dtype).eval()


def _components(arch: Architecture, dtype: torch.dtype, seed: int, device: str):
    """Yield (subfolder, module) one at a time so a full-size build holds one fp32 model at most."""
    yield "text_encoder", _seeded(seed, lambda: CLIPTextModel(_text_config(arch.text_encoder, "")), dtype, device)
    yield "text_encoder_2", _seeded(
        seed + 1, lambda: CLIPTextModelWithProjection(_text_config(arch.text_encoder_2, "")), dtype, device
    )
    yield "vae", _seeded(seed + 2, lambda: AutoencoderKL(**arch.vae), dtype, device)
    yield TINY_VAE_SUBFOLDER, _seeded(seed + 3, lambda: AutoencoderTiny(**arch.taesd), dtype, device)
    yield "unet", _seeded(seed + 4, lambda: UNet2DConditionModel(**arch.unet), dtype, device)


def build_model(
    arch: Architecture,
    directory: Path,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    on_component: Callable[[str, int], None] | None = None,
    device: str = "cpu",
) -> BuildReport:
    """Build into a temp folder beside `directory`, then rename, so an interrupted build leaves nothing."""
    started = time.perf_counter()
    dtype = dtype or getattr(torch, arch.weights_dtype)
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        write_config_folder(arch, staging)
        parameters: dict[str, int] = {}
        for name, module in _components(arch, dtype, seed, device):
            parameters[name] = sum(p.numel() for p in module.parameters())
            module.save_pretrained(staging / name, safe_serialization=True)
            if on_component:
                on_component(name, parameters[name])
            del module
        marker = {"architecture": arch.name, "random_weights": arch.random_weights, "seed": seed,
                  "drawn_on": torch.device(device).type,
                  "dtype": str(dtype).removeprefix("torch."), "parameters": parameters}
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return BuildReport(directory, parameters, size, time.perf_counter() - started)
