"""OpenAI's images API, `POST /v1/images/generations`, as the `openai` SDK and Open WebUI speak it, with the extra
fields vLLM-Omni and SGLang accept (negative_prompt, seed, num_inference_steps, guidance_scale). With
`stream: true` the images come as Server-Sent Events: `partial_images` previews while it renders, then the image."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from sdxl_split.http_service.asks import Ask, FieldProblem, check_ask
from sdxl_split.http_service.broker import Tracker
from sdxl_split.http_service.server_state import ServerState, b64, images_of, run_to_end, state

router = APIRouter(prefix="/v1")
MAX_N = 10
MAX_PARTIAL_IMAGES = 3


class ImagesRequest(BaseModel):
    """What this server reads of an images request; other fields (model, quality, style, user...) are ignored.
    None, or a field left out, means the server's own setting."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise FieldProblem("size", f"size {size!r} must be WIDTHxHEIGHT, like 1024x1024, or auto") from None
    return width, height


def ask_of(body: ImagesRequest, server: ServerState) -> Ask:
    if body.response_format not in (None, "b64_json"):
        raise FieldProblem("response_format", "only b64_json is served: this server keeps no image URLs")
    if body.output_format not in (None, "png"):
        raise FieldProblem("output_format", "only png is served")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise FieldProblem("n", f"n {n} must be from 1 to {MAX_N}")
    partial = body.partial_images or 0
    if body.stream and n > 1:
        raise FieldProblem("n", "a streamed request makes one image; ask for n=1, or leave stream off")
    if not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise FieldProblem("partial_images", f"partial_images {partial} must be from 0 to {MAX_PARTIAL_IMAGES}")
    width, height = _size(body.size)
    steps = body.num_inference_steps or server.settings.defaults.steps
    preview = max(1, steps // (partial + 1)) if body.stream and partial else 0
    fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed, "batch_size": n,
              "batches": 1, "width": width, "height": height, "steps": body.num_inference_steps,
              "guidance": body.guidance_scale, "scheduler": None, "preview_every": preview}
    names = {"batch_size": "n", "steps": "num_inference_steps", "guidance": "guidance_scale", "width": "size",
             "height": "size"}
    return check_ask(fields, server.settings.defaults, names)


def _size_text(ask: Ask) -> str:
    return f"{ask.settings.width}x{ask.settings.height}"


@router.post("/images/generations", response_model=None)
async def generations(body: ImagesRequest, request: Request,
                      response: Response) -> dict[str, Any] | StreamingResponse:
    server = state(request)
    ask = ask_of(body, server)
    tracker = server.broker.start(lambda request_id: ask.generation(request_id, server.settings.defaults.syntax))
    if body.stream:
        return StreamingResponse(_events(server, tracker, ask, body.partial_images or 0, request),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    images = await images_of(server, tracker, request, response)
    return {"created": int(time.time()), "data": [{"b64_json": b64(png), "revised_prompt": None} for png in images],
            "output_format": "png", "size": _size_text(ask)}


def _event(payload: dict[str, Any]) -> bytes:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


_NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
             "total_tokens": 0}


async def _events(server: ServerState, tracker: Tracker, ask: Ask, partial: int,
                  request: Request) -> AsyncIterator[bytes]:
    """Previews as they come (at most `partial`), then the image; an error mid-stream is an `error` event, as the
    SDK expects. A client that leaves cancels the request (the generator is closed)."""
    common = {"size": _size_text(ask), "quality": "auto", "background": "opaque", "output_format": "png"}
    # The response watches for the client leaving (and closes this generator); no second reader of the socket.
    waiting = asyncio.ensure_future(run_to_end(server, tracker, request, watch_client=False))
    preview: asyncio.Future | None = None
    try:
        sent = 0
        while not waiting.done():
            preview = asyncio.ensure_future(tracker.previews.get())
            await asyncio.wait({preview, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if preview.done() and sent < partial:
                yield _event({"type": "image_generation.partial_image", "b64_json": b64(preview.result()),
                              "partial_image_index": sent, "created_at": int(time.time()), **common})
                sent += 1
            preview.cancel()
        await waiting
        images = [png for _, png in tracker.images()]
        if not images:
            reason = next((job.failed for job in tracker.jobs if job.failed), "the request was interrupted")
            yield f"data: {json.dumps({'error': {'message': reason, 'type': 'server_error'}})}\n\n".encode()
            return
        for png in images:
            yield _event({"type": "image_generation.completed", "b64_json": b64(png), "created_at": int(time.time()),
                          "usage": _NO_USAGE, **common})
    except Exception as err:  # noqa: BLE001 - the stream has begun: an error can only be an event now
        yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n".encode()
    finally:
        if preview is not None:
            preview.cancel()  # a client that left cancels this generator mid-wait: no task is left pending
        if not waiting.done():
            waiting.cancel()
            server.broker.cancel(tracker, "the HTTP client disconnected")
            server.broker.end(tracker)

