"""Small previews of a job while it denoises, decoded from its latents with the tiny autoencoder (TAESDXL), as
A1111 and ComfyUI show them: a few milliseconds each, at most PREVIEW_SIDE pixels a side."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image

PREVIEW_SIDE = 256


class Previews:
    """Decodes with the denoiser's own VAE when it is the tiny one, else with a tiny one loaded on the first preview;
    without one (offline, say), the latents' first three channels stand in, which still show the composition."""

    def __init__(self, vae: torch.nn.Module, load_tiny: Callable[[], torch.nn.Module | None]) -> None:
        self._vae: torch.nn.Module | None = vae if type(vae).__name__ == "AutoencoderTiny" else None
        self._load_tiny = load_tiny
        self._tried = self._vae is not None

    def _tiny(self) -> torch.nn.Module | None:
        if not self._tried:
            self._tried = True
            self._vae = self._load_tiny()
        return self._vae

    @torch.inference_mode()
    def png(self, latents: torch.Tensor) -> bytes:
        """A PNG of the first image of the batch, as far as it has come."""
        vae = self._tiny()
        if vae is not None:
            param = next(vae.parameters())
            image = vae.decode(latents[:1].to(param.device, param.dtype), return_dict=False)[0][0]
            pixels = (image.float() / 2 + 0.5).clamp(0, 1)
        else:
            channels = latents[0, :3].float()
            low = channels.amin(dim=(1, 2), keepdim=True)
            pixels = (channels - low) / (channels.amax(dim=(1, 2), keepdim=True) - low).clamp(min=1e-6)
        array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        picture = Image.fromarray(array)
        picture.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()
