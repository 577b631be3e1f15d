"""The encoder's model thread: the one thread that loads the text encoders and runs every forward pass.

A front (the prompt file; HTTP requests) submits EncodeRequests from any thread. Each record the thread produces
crosses to the link loop through a queue plus the loop's wake-up pipe, the way the denoiser's render thread hands
back its replies, so the link loop never waits on a model and the model never waits on the link.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from sdxl_split.encoder_service.encode_pass import EncodeContext, EncodeStats, run_encode
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.loras import LoraUse
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.threads import use_threads
from sdxl_split.shared.wakeup import Wakeup


@dataclass(frozen=True)
class EncodeRequest:
    entries: tuple[PromptEntry, ...]
    # The front's handle for this request, handed back with everything it produced.
    tag: object = None
    # Its own encoding settings (an HTTP request's clip skip), else the run's.
    settings: EncodingSettings | None = None


@dataclass(frozen=True)
class JobReady:
    """One entry's embeddings are in the cache: its job can be queued."""

    entry: PromptEntry
    embedding_key: str
    loras: tuple[LoraUse, ...]
    tag: object


@dataclass(frozen=True)
class RequestFinished:
    """Every entry of a request has been handed over (or skipped, with a warning)."""

    tag: object
    stats: EncodeStats


@dataclass(frozen=True)
class RequestFailed:
    """A request that cannot be encoded (a LoRA its text encoders cannot read, say); the thread goes on."""

    tag: object
    reason: str
    # Set when no bad input explains it (a bug): a prompt file's run raises it; a server fails only the request.
    error: BaseException | None = None


@dataclass(frozen=True)
class ModelThreadFailed:
    """Something no request caused (a model that does not load): the encoder cannot go on."""

    error: BaseException


Handover = JobReady | RequestFinished | RequestFailed | ModelThreadFailed


class EncoderModelThread:
    """Owns the text side; `take()` on the link loop's thread collects what it produced."""

    def __init__(self, context: EncodeContext, load_text_side: Callable, wakeup: Wakeup,
                 threads: int | None = None, after_record: Callable[[], None] = lambda: None) -> None:
        self._context = context
        self._load = load_text_side
        self._text_side = None
        # The deepest clip skip the loaded text encoders allow, for fronts to check requests against; None until
        # the text side has loaded (it loads on the first request).
        self.max_clip_skip: int | None = None
        self._wakeup = wakeup
        self._threads = threads
        # A fault hook (shared.faults): runs on this thread after each record is handed over.
        self._after_record = after_record
        self._inbound: queue.SimpleQueue[EncodeRequest | None] = queue.SimpleQueue()
        self._outbound: queue.SimpleQueue[Handover] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="text-model", daemon=True)
        self._thread.start()

    def submit(self, request: EncodeRequest) -> None:
        """From any thread; requests are encoded in the order they arrive."""
        self._inbound.put(request)

    def take(self) -> list[Handover]:
        """Everything handed over since the last call, in order."""
        items = []
        while True:
            try:
                items.append(self._outbound.get_nowait())
            except queue.Empty:
                return items

    def stop_soon(self) -> None:
        """Finish the forward pass under way, then leave the rest of every request (Ctrl-C)."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._inbound.put(None)
        self._thread.join()

    def _hand(self, item: Handover) -> None:
        self._outbound.put(item)
        self._wakeup.set()

    def _text_side_once(self):
        if self._text_side is None:
            self._text_side = self._load()
            self.max_clip_skip = self._text_side.max_clip_skip
        return self._text_side

    def _serve(self) -> None:
        use_threads(self._threads)  # OpenMP keeps its thread count per thread: set it where the model runs
        while (request := self._inbound.get()) is not None:
            def sink(entry: PromptEntry, record: Embeddings, data: bytes, loras: tuple, tag=request.tag) -> None:
                self._hand(JobReady(entry, record.key, loras, tag))
                self._after_record()

            context = self._context if request.settings is None else replace(self._context, settings=request.settings)
            try:
                stats = run_encode(list(request.entries), context, self._text_side_once, sink,
                                   should_stop=self._stop.is_set)
            except UserError as err:
                self._hand(RequestFailed(request.tag, str(err)))
                continue
            except Exception as err:  # noqa: BLE001 - handed over; the loop decides what it costs
                if self._text_side is None:  # nothing loaded: no request can be served
                    self._hand(ModelThreadFailed(err))
                    return
                self._hand(RequestFailed(request.tag, f"internal error: {type(err).__name__}: {err}", err))
                continue
            except BaseException as err:  # noqa: BLE001 - handed to the link loop, which raises it there
                self._hand(ModelThreadFailed(err))
                return
            self._hand(RequestFinished(request.tag, stats))
