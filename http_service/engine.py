"""The split engine behind the HTTP server, in the server's own process: the encoder's dispatcher, model thread and
serve loop (each on a thread of its own), and the local denoiser processes, started as `run` starts its own.
Remote denoisers (`render --connect ... --serve`) join the same pool through the dispatcher's endpoint."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdxl_split.denoiser_service.spec import ServeSpec
from sdxl_split.encoder_service.config import EncodeConfig, LinkConfig
from sdxl_split.encoder_service.journal import NoJournal
from sdxl_split.encoder_service.serve_loop import Generation, GenerationListener, ServeLoop
from sdxl_split.encoder_service.service import bind_dispatcher, start_model_thread
from sdxl_split.shared import specs
from sdxl_split.shared.devices import cuda_index
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.resolve import ModelSource
from sdxl_split.shared.processes import Child, spawn_child, wait_for_exit
from sdxl_split.shared.prompt_extras import ExtrasSpec

DENOISER_ENTRY = "sdxl_split.denoiser_service.service:child_main"
# Local denoisers finish the image they hold and leave within this, once told to stop.
STOP_TIMEOUT_S = 60.0


class EngineDown(Exception):
    """The engine failed (its text encoders could not load, say) and serves nothing more; the message says why."""


@dataclass(frozen=True)
class EngineSpec:
    source: ModelSource
    settings: EncodingSettings
    cache_dir: Path
    encoder: EncodeConfig
    link: LinkConfig
    extras: ExtrasSpec
    # The local denoisers' spec (their endpoint: link.endpoint), and how many to start; 0: only remote ones.
    denoiser: ServeSpec
    denoisers: int = 1
    verbosity: int = 0


class Engine:
    def __init__(self, spec: EngineSpec, notice: Callable[[str], None]) -> None:
        self.spec = spec
        self.notice = notice
        self.failure: str | None = None
        self._stop = threading.Event()
        self._children: list[Child] = []
        self._meter = MemoryMeter(cuda_device=cuda_index(spec.encoder.device))
        cache = EmbeddingCache(spec.cache_dir / "embeddings")
        self.dispatcher = bind_dispatcher(spec.link, NoJournal(), cache, self._meter, notice)
        self.model = start_model_thread(spec, spec.encoder, cache, self._meter, self.dispatcher.wakeup, notice)
        self.loop = ServeLoop(self.dispatcher, self.model, spec.settings)
        self._thread = threading.Thread(target=self._serve, name="serve-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()
        for n in range(self.spec.denoisers):
            child = spawn_child(f"denoiser-{n}", DENOISER_ENTRY, self.spec.verbosity)
            child.send_spec(specs.dumps(self.spec.denoiser))
            self._children.append(child)

    def _serve(self) -> None:
        try:
            self.loop.run(self._stop)
        except Exception as err:  # noqa: BLE001 - said once, and every request, held or to come, is told
            self.failure = f"{type(err).__name__}: {err}"
            self.notice(f"error: the engine stopped: {self.failure}")
            self.loop.fail_all(f"the engine stopped: {self.failure}")

    # ---- for the HTTP side (any thread) ----
    def submit(self, generation: Generation, listener: GenerationListener) -> None:
        if self.failure is not None:
            raise EngineDown(self.failure)
        self.loop.submit(generation, listener)

    def cancel(self, request_id: str, reason: str, indexes: tuple[int, ...] | None = None) -> None:
        self.loop.cancel(request_id, reason, indexes)

    def max_clip_skip(self) -> int | None:
        """The model's deepest clip skip, once its text encoders have loaded."""
        return self.model.max_clip_skip

    def denoisers(self) -> int:
        return len(self.dispatcher.table.denoisers)

    def health(self) -> dict:
        return {"status": "failed" if self.failure else "ok", "denoisers": self.denoisers(),
                "local_denoisers_running": sum(child.process.is_alive() for child in self._children),
                **({"failure": self.failure} if self.failure else {})}

    def close(self) -> None:
        """Stop serving: denoisers hear BYE and leave; local ones are told, then waited for."""
        self._stop.set()
        self.dispatcher.wakeup.set()
        self._thread.join()
        self.model.close()
        self.dispatcher.close("server stopping")
        for child in self._children:
            if child.process.is_alive():
                child.process.terminate()
        for child in wait_for_exit(self._children, STOP_TIMEOUT_S):
            child.process.kill()
        self._meter.close()
