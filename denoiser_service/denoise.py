"""Turns one prompt's embeddings into images: diffusers' denoising loop, then a guarded VAE decode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.errors import JobError
from sdxl_split.shared.image_settings import SCHEDULERS
from sdxl_split.shared.memory import MemoryMeter

if TYPE_CHECKING:  # diffusers is imported by whoever loads the pipeline, not by every CLI start-up
    from diffusers import StableDiffusionXLPipeline


@dataclass(frozen=True)
class Decoded:
    images: list[Image.Image]
    # True when fp16 produced NaN/Inf and the decode was redone in fp32.
    retried_fp32: bool


def needs_fp32_decode(vae: torch.nn.Module) -> bool:
    """SDXL's VAE overflows in fp16; its config asks for an fp32 decode (force_upcast), as diffusers honours."""
    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def unet_widths(unet: torch.nn.Module) -> tuple[int, int]:
    """(prompt_embeds width, pooled width) this UNet accepts, read from its config."""
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return int(cfg.cross_attention_dim), int(pooled)


def use_scheduler(pipe: StableDiffusionXLPipeline, name: str) -> None:
    """Use a scheduler by its CLI name (a job may ask for another than the last one), configured from the model's
    own scheduler config; the model's own scheduler stays as it loaded when it is the one asked for."""
    import diffusers

    if getattr(pipe, "_sdxl_split_scheduler", None) == name:
        return
    class_name, overrides, _ = SCHEDULERS[name]
    base = getattr(pipe, "_sdxl_split_base_scheduler", None)
    if base is None:
        base = pipe._sdxl_split_base_scheduler = pipe.scheduler.config
        if type(pipe.scheduler).__name__ == class_name and not overrides:
            pipe._sdxl_split_scheduler = name
            return
    pipe.scheduler = getattr(diffusers, class_name).from_config(base, **overrides)
    pipe._sdxl_split_scheduler = name


# Called after each denoising step with (steps done, steps in all, the latents); raising stops the render.
OnStep = Callable[[int, int, torch.Tensor], None]


def generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed+i, so seeds reproduce across devices and processes."""
    return [torch.Generator("cpu").manual_seed(seed + index) for index in range(count)]


class Denoiser:
    def __init__(self, pipe: StableDiffusionXLPipeline, config: RenderConfig, meter: MemoryMeter,
                 loras=None) -> None:
        self.pipe = pipe
        self.config = config
        self.meter = meter
        # lora_bank.LoraBank: the UNet halves of the jobs' LoRAs; None renders only jobs without any.
        self.loras = loras
        self.widths = unet_widths(pipe.unet)

    def check(self, record: Embeddings) -> None:
        if record.widths != self.widths:
            raise JobError(
                f"embeddings {record.key[:12]} are {record.widths[0]}/{record.widths[1]} wide but this UNet takes "
                f"{self.widths[0]}/{self.widths[1]}: they were made by another model's text encoders; clear them "
                "with `sdxl-split --model MODEL cache verify --delete-bad` (MODEL: the one the encoder uses) and "
                "encode again"
            )

    @torch.inference_mode()
    def render(self, record: Embeddings, seed: int, count: int, loras: tuple = (),
               config: RenderConfig | None = None, on_step: OnStep | None = None) -> Decoded:
        """`config` overrides the denoiser's own for this call (a job's size, steps, guidance, scheduler)."""
        config = config or self.config
        self.check(record)
        use_scheduler(self.pipe, config.scheduler)
        if self.loras is not None:
            self.loras.apply(loras)
        elif loras:
            raise JobError("this denoiser was started without LoRA support, and the job needs LoRAs")
        t = record.tensors
        with self.meter.phase("denoise"):
            latents = self.pipe(
                prompt_embeds=t["prompt_embeds"],
                negative_prompt_embeds=t["negative_prompt_embeds"],
                pooled_prompt_embeds=t["pooled_prompt_embeds"],
                negative_pooled_prompt_embeds=t["negative_pooled_prompt_embeds"],
                num_images_per_prompt=count,
                generator=generators(seed, count),
                height=config.height,
                width=config.width,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                output_type="latent",
                **({"callback_on_step_end": _step_callback(on_step, config.steps)} if on_step else {}),
            ).images
        if not torch.isfinite(latents).all():
            # Said here, at the stage that failed: a VAE given NaN latents would be blamed for them.
            raise JobError(f"the UNet produced NaN/Inf latents ({config.dtype}, guidance {config.guidance:g}); "
                           "nothing was decoded; in fp16 try --dtype bf16, or a lower --guidance")
        with self.meter.phase("decode"):
            return self.decode(latents)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The decode step of StableDiffusionXLPipeline.__call__, kept op-for-op so pixels match it."""
        vae = self.pipe.vae
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        latents = latents.to(_execution_device(vae))
        return vae.decode(latents, return_dict=False)[0]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> Decoded:
        vae = self.pipe.vae
        upcast = needs_fp32_decode(vae)
        retried = False
        if upcast:
            vae.to(dtype=torch.float32)
        if latents.dtype != vae.dtype:  # upcast now, or kept in fp32 since loading (group offload)
            latents = latents.to(vae.dtype)
        try:
            image = self._vae_decode(latents)
            if not torch.isfinite(image).all():
                if vae.dtype == torch.float32:
                    raise JobError("the VAE decoded NaN/Inf even in fp32; this image cannot be rendered")
                original = vae.dtype
                vae.to(dtype=torch.float32)
                try:
                    image = self._vae_decode(latents.to(torch.float32))
                finally:
                    vae.to(dtype=original)
                retried = True
                if not torch.isfinite(image).all():
                    raise JobError("the VAE decoded NaN/Inf in fp16 and again in fp32; not writing a black image")
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        images = self.pipe.image_processor.postprocess(image, output_type="pil")
        self.pipe.maybe_free_model_hooks()
        return Decoded(images=images, retried_fp32=retried)


def _step_callback(on_step: OnStep, steps: int):
    """diffusers' callback_on_step_end, calling `on_step` with 1-based steps; an exception raised in it ends the
    denoising loop there."""
    def after_step(pipe, step: int, timestep, tensors: dict) -> dict:
        on_step(step + 1, steps, tensors["latents"])
        return tensors

    return after_step


def _execution_device(module: torch.nn.Module) -> torch.device:
    from diffusers.utils.torch_utils import get_module_execution_device

    return get_module_execution_device(module)
