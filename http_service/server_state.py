"""What the HTTP handlers share: the server's settings, its broker, and the helpers every route uses (waiting for a
request while watching for the client to leave, reading the PNGs' infotexts)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass

from fastapi import Request, Response
from PIL import Image

from sdxl_split.http_service.asks import Defaults
from sdxl_split.http_service.broker import Broker, Tracker


@dataclass(frozen=True)
class ModelInfo:
    """How the model is named to clients, as A1111 names checkpoints."""

    name: str
    hash: str  # A1111's 10 hex digits
    sha256: str | None = None
    location: str = ""

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name


@dataclass(frozen=True)
class ServerSettings:
    defaults: Defaults
    model: ModelInfo
    max_queue: int
    api_key: str | None = None
    lora_dir: str | None = None
    version: str = ""


@dataclass
class ServerState:
    settings: ServerSettings
    broker: Broker


def state(request: Request) -> ServerState:
    return request.app.state.server


def client_gone(request: Request) -> asyncio.Future:
    """Completes when the HTTP client disconnects: its request body is read, so the next message from the server
    (uvicorn) is the disconnect. No polling."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(watch())


async def run_to_end(server: ServerState, tracker: Tracker, request: Request, watch_client: bool = True) -> None:
    """Wait for a request to end, cancelling it if its client leaves; the broker forgets it either way."""
    gone = client_gone(request) if watch_client else asyncio.get_running_loop().create_future()
    try:
        await server.broker.wait(tracker, gone)
    finally:
        gone.cancel()
        server.broker.end(tracker)


class RenderFailed(Exception):
    """Every job of a request failed on the denoisers (after their retries); answered 500 with the reason."""


async def images_of(server: ServerState, tracker: Tracker, request: Request, response: Response) -> list[bytes]:
    """Wait for a request to end (cancelled if its client leaves): its PNGs, in order, with the Server-Timing
    header set; RenderFailed when every job failed."""
    await run_to_end(server, tracker, request)
    images = [png for _, png in tracker.images()]
    failures = [job.failed for job in tracker.jobs if job.failed]
    if failures and not images:
        raise RenderFailed(failures[0])
    response.headers["Server-Timing"] = server_timing(tracker)
    return images


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def infotext(png: bytes) -> str:
    """The A1111 `parameters` text chunk of a PNG this server made. Its writer puts the chunk before the pixels,
    where opening the file finds it: `.text` would decompress every pixel to look behind them too (some 15 ms
    for a 1024² image, on the event loop's thread)."""
    with Image.open(io.BytesIO(png)) as image:
        return str(image.info.get("parameters", ""))


def server_timing(tracker: Tracker) -> str:
    """A `Server-Timing` header (shown by browsers' developer tools; read by benchmarks/serve_load.py): the
    denoisers' time on the request's jobs, summed, and the server's time on the whole request."""
    denoise_ms = sum(job.seconds for job in tracker.jobs) * 1000
    total_ms = (time.monotonic() - tracker.started) * 1000
    return f'denoise;dur={denoise_ms:.1f};desc="denoiser time summed over jobs", total;dur={total_ms:.1f}'
