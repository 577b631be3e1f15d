"""AUTOMATIC1111's /sdapi/v1 API, as Open WebUI, SillyTavern, LibreChat and the `webuiapi` client speak it: field
names and shapes of A1111's modules/api/models.py; settings a request leaves out are the server's own."""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from sdxl_split.http_service.asks import Ask, FieldProblem, check_ask
from sdxl_split.http_service.infotext import parse_infotext
from sdxl_split.http_service.samplers import UnknownSampler, sampler_items, scheduler_for, scheduler_items
from sdxl_split.http_service.server_state import ServerState, b64, images_of, infotext, state
from sdxl_split.shared.encoding_settings import A1111_CLIP_SKIP_BASE, MAX_CLIP_SKIP
from sdxl_split.shared.image_settings import SCHEDULERS

router = APIRouter(prefix="/sdapi/v1")


class Txt2ImgRequest(BaseModel):
    """The fields of A1111's StableDiffusionTxt2ImgProcessingAPI this server reads; any other is ignored, as A1111
    ignores it. None means the server's own setting."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed_strength: float | None = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool | None = False
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None


# What the 422 calls each field: its A1111 name.
_NAMES = {"batches": "n_iter", "guidance": "cfg_scale", "scheduler": "sampler_name", "clip_skip": "override_settings"}


def _unsupported(body: Txt2ImgRequest, model_title: str, model_name: str) -> None:
    """Features of A1111's txt2img this server does not have: refused, rather than an image made without them."""
    refused = (("enable_hr", body.enable_hr, "hires fix"), ("restore_faces", body.restore_faces, "face restoration"),
               ("tiling", body.tiling, "tiling"), ("subseed_strength", body.subseed_strength, "variation seeds"),
               ("script_name", body.script_name, "scripts"), ("alwayson_scripts", body.alwayson_scripts, "scripts"),
               ("styles", body.styles, "styles"))
    for field_name, value, what in refused:
        if value:
            raise FieldProblem(field_name, f"{what} is not supported by this server; leave {field_name} unset")
    checkpoint = (body.override_settings or {}).get("sd_model_checkpoint")
    if checkpoint and checkpoint not in (model_title, model_name):
        raise FieldProblem("override_settings", f"this server runs one model, {model_title}; it cannot switch to "
                                                f"{checkpoint!r}")


def ask_of(body: Txt2ImgRequest, server: ServerState) -> Ask:
    settings = server.settings
    _unsupported(body, settings.model.title, settings.model.name)
    try:
        scheduler = scheduler_for(body.sampler_name or body.sampler_index, body.scheduler) \
            if (body.sampler_name or body.sampler_index or body.scheduler) else None
    except UnknownSampler as err:
        raise FieldProblem("sampler_name", str(err)) from None
    layers = (body.override_settings or {}).get("CLIP_stop_at_last_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)
                               or not 1 <= layers <= MAX_CLIP_SKIP + A1111_CLIP_SKIP_BASE):
        raise FieldProblem("override_settings", "CLIP_stop_at_last_layers must be a whole number from 1 to "
                                                f"{MAX_CLIP_SKIP + A1111_CLIP_SKIP_BASE}")
    deepest = server.broker.engine.max_clip_skip()  # None before the first request loads the text encoders
    if layers is not None and deepest is not None and layers - A1111_CLIP_SKIP_BASE > deepest:
        raise FieldProblem("override_settings", f"CLIP_stop_at_last_layers {layers} goes deeper than this model's "
                                                f"text encoders; at most {deepest + A1111_CLIP_SKIP_BASE}")
    fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed,
              "batch_size": body.batch_size, "batches": body.n_iter, "width": body.width, "height": body.height,
              "steps": body.steps, "guidance": body.cfg_scale, "scheduler": scheduler,
              "clip_skip": max(0, layers - A1111_CLIP_SKIP_BASE) if layers else None}
    return check_ask(fields, settings.defaults, _NAMES)


def _info(ask: Ask, server: ServerState, texts: list[str]) -> dict[str, Any]:
    """A1111's Processed.js(): what the images were made with, the resolved seed included."""
    total = ask.batch_size * ask.batches
    settings = ask.settings
    return {
        "prompt": ask.prompt, "all_prompts": [ask.prompt] * total, "negative_prompt": ask.negative_prompt or "",
        "all_negative_prompts": [ask.negative_prompt or ""] * total, "seed": ask.seed, "all_seeds": ask.seeds,
        "subseed": -1, "all_subseeds": [-1] * total, "subseed_strength": 0, "width": settings.width,
        "height": settings.height, "sampler_name": SCHEDULERS[settings.scheduler][2], "cfg_scale": settings.guidance,
        "steps": settings.steps, "batch_size": ask.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": server.settings.model.name,
        "sd_model_hash": server.settings.model.hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": (ask.clip_skip or 0) + A1111_CLIP_SKIP_BASE,
        "is_using_inpainting_conditioning": False, "version": server.settings.version,
    }


@router.post("/txt2img")
async def txt2img(body: Txt2ImgRequest, request: Request, response: Response) -> dict[str, Any]:
    server = state(request)
    ask = ask_of(body, server)
    tracker = server.broker.start(lambda request_id: ask.generation(request_id, server.settings.defaults.syntax))
    images = await images_of(server, tracker, request, response)
    return {"images": [b64(png) for png in images] if body.send_images else [],
            "parameters": body.model_dump(), "info": json.dumps(_info(ask, server, [infotext(png) for png in images]))}


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    tracker = state(request).broker.current()
    idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if tracker is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
    elapsed = time.monotonic() - tracker.started
    fraction = max(0.01, tracker.fraction)
    running = next((job for job in tracker.jobs if job.steps and not job.finished), None)
    return {
        "progress": min(fraction, 1.0), "eta_relative": max(0.0, elapsed / fraction - elapsed),
        "state": {**idle, "interrupted": tracker.interrupted, "job": tracker.request_id,
                  "job_count": len(tracker.jobs), "job_no": sum(job.finished for job in tracker.jobs),
                  "sampling_step": running.step if running else 0, "sampling_steps": running.steps if running else 0},
        "current_image": b64(tracker.preview) if tracker.preview and not skip_current_image else None,
        "textinfo": None,
    }


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    """Stop the request /progress reports on (the oldest); it answers with the images already finished."""
    broker = state(request).broker
    if (tracker := broker.current()) is not None:
        broker.cancel(tracker, "interrupted")
    return {}


@router.post("/skip")
async def skip(request: Request) -> None:
    """Stop the batch now rendering of the oldest request; its other batches go on."""
    broker = state(request).broker
    if (tracker := broker.current()) is not None:
        broker.skip(tracker)


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    model = state(request).settings.model
    return [{"title": model.title, "model_name": model.name, "hash": model.hash, "sha256": model.sha256,
             "filename": model.location, "config": None}]


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return sampler_items()


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return scheduler_items()


@router.get("/sd-vae")
@router.get("/upscalers")
@router.get("/latent-upscale-modes")
async def nothing_to_choose() -> list:
    """Lists of things this server has none of to offer (clients ask for them when they connect)."""
    return []


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    from sdxl_split.shared.loras import declared

    folder = state(request).settings.lora_dir
    found = []
    for path in sorted(Path(folder).glob("*.safetensors")) if folder else []:
        try:
            metadata = declared(path)[1]
        except Exception:  # noqa: BLE001 - a file that is no LoRA is listed by nothing
            continue
        found.append({"name": path.stem, "alias": metadata.get("ss_output_name", path.stem), "path": str(path),
                      "metadata": metadata})
    return found


def _options(server: ServerState) -> dict[str, Any]:
    defaults = server.settings.defaults
    return {"sd_model_checkpoint": server.settings.model.title, "sd_checkpoint_hash": server.settings.model.sha256,
            "CLIP_stop_at_last_layers": 1, "samples_format": "png", "enable_pnginfo": True,
            "live_previews_enable": defaults.preview_every > 0,
            "show_progress_every_n_steps": defaults.preview_every or -1}


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    return _options(state(request))


@router.post("/options")
async def set_options(body: dict[str, Any], request: Request) -> dict[str, Any]:
    """Options are read-only here: each one given is either what the server already runs, or reported with why
    it stays. (Open WebUI posts back everything it read, unchanged but for the model.)"""
    current = _options(state(request))
    model = state(request).settings.model
    same = [key for key, value in body.items() if current.get(key) == value
            or (key == "sd_model_checkpoint" and value in (model.name, model.title))]
    kept = {key: (f"this server runs one model, {model.title}; switching is not supported"
                  if key == "sd_model_checkpoint" else "read-only on this server")
            for key in body if key not in same}
    return {"applied": same, "not_applied": kept}


class PngInfoRequest(BaseModel):
    image: str


@router.post("/png-info")
async def png_info(body: PngInfoRequest) -> dict[str, Any]:
    encoded = body.image.split(",", 1)[1] if body.image.startswith("data:") else body.image
    try:
        with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))) as image:
            items = {key: value for key, value in image.info.items() if isinstance(value, str)}
    except (binascii.Error, ValueError, UnidentifiedImageError):
        raise FieldProblem("image", "image must be a base64 PNG (a data: URL prefix is allowed)") from None
    except (OSError, Image.DecompressionBombError) as err:  # cut short, or a header claiming billions of pixels
        raise FieldProblem("image", f"image is not a whole, sane PNG ({err}); send the file as saved") from None
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}
