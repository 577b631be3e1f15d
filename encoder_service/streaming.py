"""One encode run with the link up: encode (or read from cache), queue each job at once, serve denoisers to the end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from sdxl_split.encoder_service.config import LinkConfig
from sdxl_split.encoder_service.dispatcher import Dispatcher
from sdxl_split.encoder_service.encode_loop import EncodeStats, run_encode
from sdxl_split.encoder_service.journal import Journal
from sdxl_split.shared import protocol as p
from sdxl_split.shared.embedding_cache import Bad, EmbeddingCache, Hit
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.jobs import work_id
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.prompt_extras import Extras
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.wakeup import watch_stop

if TYPE_CHECKING:  # diffusers loads only when some prompt actually needs encoding
    from sdxl_split.encoder_service.text_side import TextSide

T = TypeVar("T")


@dataclass
class StreamResult:
    encode: EncodeStats
    jobs: int
    already_done: int
    done: int
    dead_lettered: int
    abandoned: int
    denoisers_attached: bool
    interrupted: bool


def run_streaming_encode(
    entries: list[PromptEntry],
    settings: EncodingSettings,
    cache: EmbeddingCache,
    load_text_side: Callable[[], TextSide],
    meter: MemoryMeter,
    link: LinkConfig,
    journal: Journal,
    wait_s: float,
    stop: threading.Event,
    report: Callable[[str], None],
    batch_size: int = 1,
    on_progress: Callable[[int], None] = lambda n: None,
    on_bound: Callable[[], None] = lambda: None,
    throttle_s: float = 0.0,
    widths: tuple[int, int] | None = None,
    on_event: Callable[[str, str, dict], None] = lambda name, work_id, fields: None,
    extras_of: Callable[[PromptEntry], Extras] = Extras,
) -> StreamResult:
    """Jobs are dispatched as they appear; the dispatcher skips those whose images the journal shows
    intact in the output folder of the denoiser they would go to."""
    def fetch(key: str) -> tuple[Embeddings, bytes]:
        found = cache.lookup(key)
        if isinstance(found, Hit):
            return found.record, found.data
        raise LookupError(found.problem if isinstance(found, Bad) else f"cache entry {key[:12]} is gone")

    dispatcher = Dispatcher(link, journal, fetch, report=report, on_event=on_event)
    watch_stop(stop, dispatcher.wakeup)
    on_bound()
    seen: set[str] = set()

    def sink(entry: PromptEntry, record: Embeddings, data: bytes, loras: tuple = ()) -> None:
        wid = work_id(record.key, entry.seed, entry.count, loras)
        if wid in seen:
            return
        seen.add(wid)
        dispatcher.add(wid, entry, record.key, loras)
        # Hand the job out now, so the GPU starts while later prompts are still being encoded.
        dispatcher.pump(0)
        if throttle_s:
            dispatcher.serve_for(throttle_s)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text-side")

    def serving(work: Callable[[], T]) -> T:
        # Loading CLIP-bigG takes seconds to minutes, and one forward pass seconds on a busy CPU: run them
        # off the main thread and keep the link served, or denoisers take the silence for a dead encoder.
        running = pool.submit(work)
        running.add_done_callback(lambda _: dispatcher.wakeup.set())
        while not running.done():
            dispatcher.pump(link.heartbeat_s)
        return running.result()

    class ServedTextSide:
        def __init__(self, inner: TextSide) -> None:
            self.inner = inner

        def encode(self, batch: list[PromptEntry], clip_skip: int | None) -> list:
            return serving(lambda: self.inner.encode(batch, clip_skip))

        def encode_compiled(self, entry: PromptEntry, clip_skip: int | None, syntax: str):
            return serving(lambda: self.inner.encode_compiled(entry, clip_skip, syntax))

        def use_loras(self, loras: tuple) -> None:
            serving(lambda: self.inner.use_loras(loras))

    def load_while_serving() -> ServedTextSide:
        return ServedTextSide(serving(load_text_side))

    crashed: BaseException | None = None
    try:
        stats = run_encode(entries, settings, cache, load_while_serving, sink, meter, batch_size=batch_size,
                           on_progress=on_progress, warn=lambda m: report(f"warning: {m}"),
                           should_stop=stop.is_set, widths=widths, extras_of=extras_of)
        idle_since = time.monotonic()
        table = dispatcher.table
        while table.outstanding and not stop.is_set():
            if table.workers:
                idle_since = time.monotonic()
                dispatcher.pump(link.heartbeat_s)
                continue
            # No denoiser: wait for one at most wait_s (a denoiser still loading its model heartbeats before
            # READY; that counts as coming), and not a poll timeout longer.
            left = wait_s - (time.monotonic() - max(idle_since, dispatcher.last_peer_seen))
            if left < 0:
                break
            dispatcher.pump(min(link.heartbeat_s, left))
        if stop.is_set():
            drain(dispatcher, report)
        counts = table.counts()
        leftovers = table.leftovers()
        for job in leftovers:
            journal.log("abandoned", job.work_id, state=job.state.value)
        return StreamResult(encode=stats, jobs=len(seen), already_done=table.already_done, done=counts["done"],
                            dead_lettered=counts["dead"], abandoned=len(leftovers),
                            denoisers_attached=table.ever_attached, interrupted=stop.is_set())
    except BaseException as err:
        crashed = err
        raise
    finally:
        pool.shutdown(wait=True)
        if crashed is not None and not isinstance(crashed, KeyboardInterrupt):
            # Denoisers should hear that this run failed, not that it finished.
            dispatcher.close(p.reason_text(f"encoder failed: {type(crashed).__name__}: {crashed}"), dead=True)
        else:
            dispatcher.close("encoder stopping" if stop.is_set() else "encoder finished")


DRAIN_TIMEOUT_S = 300.0


def drain(dispatcher: Dispatcher, report: Callable[[str], None]) -> None:
    """On Ctrl-C: hand out nothing new, but let images already on a GPU finish and be journaled.
    A second Ctrl-C raises KeyboardInterrupt out of here."""
    table = dispatcher.table
    table.draining = True
    if table.in_flight:
        report(f"waiting for {table.in_flight} image batch(es) in flight; Ctrl-C again to stop now")
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while table.in_flight and table.workers and time.monotonic() < deadline:
        dispatcher.pump(dispatcher.config.heartbeat_s)
