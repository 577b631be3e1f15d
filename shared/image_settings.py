"""The settings of the images themselves (size, steps, guidance, sampler) and their bounds, checked alike wherever
they come from: the CLI, a job on the wire, an HTTP request. A job may carry its own (JobSettings) to override a
denoiser's defaults. No torch here."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

# CLI name -> (diffusers scheduler class, extra config, A1111 sampler name for PNG metadata).
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
# SDXL renders up to 4096 px a side (VAE tiling keeps such decodes in memory); one job's batch is capped at 4
# images of 2048^2, beyond which a GPU of today runs out of memory.
MAX_SIDE = 4096
MAX_BATCH_PIXELS = 4 * 2048 * 2048
MAX_GUIDANCE = 100.0
MAX_STEPS = 1000


def side_problem(value: int, name: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
        return f"image {name} {value} must be a positive multiple of 8 (the VAE works in 8x8 blocks)"
    if value > MAX_SIDE:
        return f"image {name} {value} is over {MAX_SIDE} pixels; SDXL is trained at 1024: ask for 1024 and upscale"
    return None


def batch_problem(width: int, height: int, count: int) -> str | None:
    pixels = width * height * count
    if pixels > MAX_BATCH_PIXELS:
        return (f"{count} images of {width}x{height} in one batch are {pixels / 1e6:.0f} M pixels, over the "
                f"{MAX_BATCH_PIXELS / 1e6:.0f} M a job may hold; ask for fewer or smaller images")
    return None


def steps_problem(steps: Any) -> str | None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        return f"steps {steps} must be a whole number from 1 to {MAX_STEPS}"
    return None


def guidance_problem(guidance: Any) -> str | None:
    if (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance)
            or not 0 <= guidance <= MAX_GUIDANCE):
        return (f"guidance {guidance} must be from 0 to {MAX_GUIDANCE:g} (1 turns guidance off; SDXL is usually run "
                "at 5 to 8)")
    return None


def scheduler_problem(name: Any) -> str | None:
    if name not in SCHEDULERS:
        return f"scheduler {str(name)[:40]!r} is not one of {', '.join(SCHEDULERS)}"
    return None


@dataclass(frozen=True)
class JobSettings:
    """What a job may choose for itself (an HTTP request's size, steps, CFG and sampler); None leaves the
    denoiser's own setting. The denoiser's load-time options (dtype, VAE, compile, offload...) are never a job's."""

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None

    def problem(self) -> str | None:
        """Why these settings cannot be rendered, or None."""
        for value, name in ((self.width, "width"), (self.height, "height")):
            if value is not None and (problem := side_problem(value, name)):
                return problem
        checks = ((self.steps, steps_problem), (self.guidance, guidance_problem), (self.scheduler, scheduler_problem))
        return next((problem for value, check in checks if value is not None and (problem := check(value))), None)

    def as_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def over(self, defaults: Any) -> Any:
        """`defaults` (a RenderConfig, or anything with these fields) with the settings this job chose."""
        return replace(defaults, **{name: value for name, value in self.as_dict().items() if value is not None})


@dataclass(frozen=True)
class JobOptions:
    """What a job asks of its denoiser beyond its prompt: its own image settings, a small preview every
    `preview_every` steps while it renders (0: none), and its PNGs sent back over the link."""

    settings: JobSettings = JobSettings()
    preview_every: int = 0
    return_images: bool = False

    def problem(self) -> str | None:
        if isinstance(self.preview_every, bool) or not isinstance(self.preview_every, int) \
                or not 0 <= self.preview_every <= MAX_STEPS:
            return f"preview_every {self.preview_every} must be a whole number from 0 to {MAX_STEPS}"
        if not isinstance(self.return_images, bool):
            return "return_images must be true or false"
        return self.settings.problem()

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.as_dict(), "preview_every": self.preview_every,
                "return_images": self.return_images}
