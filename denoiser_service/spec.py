"""What a denoiser is started with: the frozen specs `run`, `render` and the Ray engine build, and a child
process receives as JSON. No torch here: the process that builds them only plans the work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.naming import ModelIdentity
from sdxl_split.shared.digests import file_sha256
from sdxl_split.shared.faults import Faults
from sdxl_split.shared.models.resolve import DENOISE_COMPONENTS, ModelSource, display_name, fingerprint
from sdxl_split.shared.prompt_extras import ExtrasSpec


@dataclass(frozen=True)
class DenoiserSpec:
    """Which model, named how in metadata, rendered with which settings."""

    source: ModelSource
    identity: ModelIdentity
    config: RenderConfig
    # Where LoRA hashes are memoised.
    cache_dir: Path
    # torch CPU threads for this process; None: one per core.
    threads: int | None = None
    extras: ExtrasSpec = ExtrasSpec()
    # LoRA adapters kept loaded at once; or the run's --lora set fused into the UNet (and no other accepted).
    lora_cache: int = 8
    fuse_lora: bool = False
    # LoRA files the process that planned the work resolved (run's, render --prompts'): jobs naming them by hash
    # render with these, from whatever folder the denoiser runs in.
    lora_files: tuple[Path, ...] = ()
    faults: Faults = Faults()


@dataclass(frozen=True)
class ServeSpec:
    """A denoiser taking jobs from an encoder's endpoint."""

    denoiser: DenoiserSpec
    endpoint: str
    credits: int = 2
    # Keep serving encode runs one after another instead of exiting after the first one's BYE.
    serve: bool = False
    curve_dir: Path | None = None


def model_identity(source: ModelSource, cache_dir: Path, full_metadata: bool = False) -> ModelIdentity:
    digest = file_sha256(Path(source.location), cache_dir)[:10] if source.kind == "single_file" else ""
    return ModelIdentity(name=display_name(source), fingerprint=fingerprint(source, DENOISE_COMPONENTS, cache_dir),
                         hash=digest, source=source.spec if full_metadata else None)
