"""Deterministic job and image ids: the same inputs always name the same output file."""

from __future__ import annotations

import hashlib
import json
import re

_SLUG = re.compile(r"[^a-z0-9]+")


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _loras(loras: tuple) -> dict:
    # Left out when empty, so jobs without LoRAs keep the ids (and file names) they always had.
    return {"unet_loras": [[use.name, use.sha256, use.scale] for use in loras]} if loras else {}


def job_id_for(embedding_key: str, seed: int | None, count: int | None, loras: tuple = (),
               settings: dict | None = None) -> str:
    """A job's identity on the encoder side. The renderer adds its own settings (size, steps...) to
    name files, so this id only covers what the prompt file decides (its UNet LoRAs too: a UNet-only LoRA
    leaves the embeddings alone but not the image), and the image settings a job chose for itself (an HTTP
    request's); without those, ids stay what they always were."""
    chosen = {"settings": settings} if settings and any(v is not None for v in settings.values()) else {}
    return _digest({"embedding_key": embedding_key, "seed": seed, "count": count, **_loras(loras), **chosen})


def render_id(embedding_key: str, seed: int, count: int, pixel_settings: dict, model: str, loras: tuple = ()) -> str:
    """A job as one denoiser renders it: the job's own inputs plus the model and every setting that decides its
    pixels. Image ids and file names derive from it. The batch size is part of it because batched matmuls may
    differ in the last bit from unbatched ones."""
    return _digest({"embedding_key": embedding_key, "seed": seed, "count": count, "model": model, **pixel_settings,
                    **_loras(loras)})


def settings_id(pixel_settings: dict, model: str) -> str:
    """Everything a denoiser adds to a job to decide its pixels, as one digest."""
    return _digest({"model": model, **pixel_settings})


def image_id(render: str, index: int) -> str:
    return _digest({"job": render, "index": index})


def image_filename(prompt: str, image: str) -> str:
    slug = _SLUG.sub("-", prompt.lower()).strip("-")[:48].rstrip("-") or "prompt"
    return f"{slug}-{image[:16]}.png"
