"""VAE decode guards: tiling really splits an SDXL-size decode, and NaN never becomes a silent black image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.denoise import Denoiser
from sdxl_split.denoiser_service.pipeline import build_denoiser, configure_tiling
from sdxl_split.shared.errors import JobError
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.architectures import SDXL_VAE
from sdxl_split.shared.models.resolve import resolve_model


def test_default_tiling_would_not_split_a_1024_decode_but_ours_does(monkeypatch) -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE)
    latents_1024 = torch.zeros(1, 4, 128, 128)
    vae.enable_tiling()
    # diffusers' own threshold: tiles only when the latent is larger than sample_size / 8 = 128.
    assert not latents_1024.shape[-1] > vae.tile_latent_min_size
    configure_tiling(vae, 512)
    calls = []
    monkeypatch.setattr(vae, "tiled_decode", lambda z, return_dict=True: calls.append(z.shape) or (z,))
    vae._decode(latents_1024, return_dict=False)
    assert calls == [latents_1024.shape]
    assert vae.tile_latent_min_size == 64


@pytest.fixture()
def denoiser(session_cache: Path) -> Denoiser:
    source = resolve_model("tiny", session_cache)
    config = RenderConfig(width=64, height=64, steps=2)
    return build_denoiser(source, config, MemoryMeter())


def test_nan_decode_in_fp32_fails_the_job(denoiser: Denoiser, monkeypatch) -> None:
    monkeypatch.setattr(denoiser, "_vae_decode", lambda latents: torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(JobError, match="NaN"):
        denoiser.decode(torch.zeros(1, 4, 8, 8))


def test_nan_in_half_precision_is_retried_in_fp32(denoiser: Denoiser, monkeypatch) -> None:
    denoiser.pipe.vae.to(torch.bfloat16)
    real = denoiser._vae_decode

    def flaky(latents: torch.Tensor) -> torch.Tensor:
        if denoiser.pipe.vae.dtype != torch.float32:
            return torch.full((1, 3, 64, 64), float("nan"))
        return real(latents)

    monkeypatch.setattr(denoiser, "_vae_decode", flaky)
    decoded = denoiser.decode(torch.zeros(1, 4, 8, 8))
    assert decoded.retried_fp32 and len(decoded.images) == 1
    assert denoiser.pipe.vae.dtype == torch.bfloat16
