"""The encoder as a service: one frozen spec in (prompts, model, settings, link), one summary out. `encode` and
`run`'s encoder child both call `run_encoder`; notices and progress go to callbacks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import zmq

from sdxl_split.encoder_service.config import EncodeConfig, LinkConfig
from sdxl_split.encoder_service.dispatcher import Dispatcher
from sdxl_split.encoder_service.encode_pass import EncodeContext
from sdxl_split.encoder_service.encoder_loop import EncoderLoop
from sdxl_split.encoder_service.journal import Journal, NoJournal
from sdxl_split.encoder_service.model_thread import EncoderModelThread
from sdxl_split.encoder_service.spec import EncodeSpec
from sdxl_split.shared import protocol as p
from sdxl_split.shared.devices import cuda_index
from sdxl_split.shared.embedding_cache import Bad, EmbeddingCache, Hit
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.resolve import ModelSource, text_widths
from sdxl_split.shared.prompt_extras import ExtrasSpec
from sdxl_split.shared.wakeup import Wakeup, watch_stop

Notice = Callable[[str], None]
Event = Callable[[str, str, dict], None]


def cache_fetch(cache: EmbeddingCache) -> Callable[[str], tuple[Embeddings, bytes]]:
    """How the dispatcher reads a job's record when it sends it: only keys are queued, so memory stays flat."""
    def fetch(key: str) -> tuple[Embeddings, bytes]:
        found = cache.lookup(key)
        if isinstance(found, Hit):
            return found.record, found.data
        raise LookupError(found.problem if isinstance(found, Bad) else f"cache entry {key[:12]} is gone")

    return fetch


def text_side_loader(source: ModelSource, config: EncodeConfig, inversions: tuple, notice: Notice) -> Callable:
    """Loads the text encoders (on the model thread, the first time a prompt misses the cache)."""
    def load():
        from sdxl_split.encoder_service.text_side import TextSide

        notice(f"loading text encoders of {source.description} on {config.device} ({config.dtype})")
        return TextSide(source, config.device, config.dtype, inversions=inversions)

    return load


def bind_dispatcher(link: LinkConfig, journal: Journal | NoJournal, cache: EmbeddingCache, meter: MemoryMeter,
                    notice: Notice, on_event: Event = lambda name, job, fields: None) -> Dispatcher:
    """The encoder's ROUTER socket, bound; an endpoint another process holds is one line naming it."""
    try:
        return Dispatcher(link, journal, cache_fetch(cache), report=notice, on_event=on_event)
    except zmq.ZMQError as err:
        meter.close()
        raise UserError(f"cannot listen for denoisers on {link.endpoint} ({err.strerror}); is another encoder or "
                        "server running? pass --bind with another endpoint") from None


class TextSideSpec(Protocol):
    """What the text side's thread needs of a spec: EncodeSpec's, or the HTTP server's EngineSpec's."""

    source: ModelSource
    settings: EncodingSettings
    cache_dir: Path
    extras: ExtrasSpec


def start_model_thread(spec: TextSideSpec, config: EncodeConfig, cache: EmbeddingCache, meter: MemoryMeter,
                       wakeup: Wakeup, notice: Notice, after_record: Callable[[], None] = lambda: None,
                       ) -> EncoderModelThread:
    """The text side's thread for an encoder (a prompt file's, or the HTTP server's): it loads the text encoders on
    the first cache miss and hands each record to the loop that `wakeup` wakes."""
    extras = spec.extras.resolver(spec.cache_dir)
    context = EncodeContext(spec.settings, cache, meter, batch_size=config.batch_size, widths=text_widths(spec.source),
                            extras_of=extras.resolve, warn=lambda message: notice(f"warning: {message}"))
    return EncoderModelThread(context, text_side_loader(spec.source, config, extras.inversions, notice), wakeup,
                              threads=config.threads, after_record=after_record)


def run_encoder(spec: EncodeSpec, stop: threading.Event, notice: Notice,
                on_progress: Callable[[int], None] = lambda n: None,
                on_bound: Callable[[], None] = lambda: None, on_event: Event = lambda name, job, fields: None) -> dict:
    """Encode (or read from the cache) every prompt, stream the jobs to denoisers, and summarise."""
    cache = EmbeddingCache(spec.cache_dir / "embeddings")
    journal = Journal(spec.journal_path)
    meter = MemoryMeter(cuda_device=cuda_index(spec.config.device))
    on_event, after_record = spec.faults.encoder_seam(on_event)
    dispatcher = bind_dispatcher(spec.link, journal, cache, meter, notice, on_event)
    watch_stop(stop, dispatcher.wakeup)
    on_bound()
    model = start_model_thread(spec, spec.config, cache, meter, dispatcher.wakeup, notice, after_record)
    crashed: BaseException | None = None
    try:
        outcome = EncoderLoop(dispatcher, model, on_progress).run_file(list(spec.entries), spec.wait_s, stop)
        memory = meter.summary()
    except BaseException as err:
        crashed = err
        raise
    finally:
        model.close()
        meter.close()
        if crashed is not None and not isinstance(crashed, KeyboardInterrupt):
            # Denoisers should hear that this run failed, not that it finished.
            dispatcher.close(p.reason_text(f"encoder failed: {type(crashed).__name__}: {crashed}"), dead=True)
        else:
            dispatcher.close("encoder stopping" if stop.is_set() else "encoder finished")
    stats = outcome.encode
    stats.skipped_lines = spec.skipped_lines
    return {"stats": stats.as_dict(), "memory": memory, "cache_dir": str(cache.root), "journal": str(journal.path),
            "model": spec.source.description, "jobs": outcome.jobs, "already_done": outcome.already_done,
            "done": outcome.done, "dead_lettered": outcome.dead_lettered, "abandoned": outcome.abandoned,
            "denoisers_attached": outcome.denoisers_attached, "interrupted": outcome.interrupted}


def child_main(hooks, spec_json: str) -> None:
    """`run`'s encoder process (shared.processes.child_process): readiness is "bound", the result the summary."""
    from sdxl_split.encoder_service.progress import EncodeProgress
    from sdxl_split.shared import specs
    from sdxl_split.shared.processes import install_stop_handlers
    from sdxl_split.shared.wakeup import StopFlag

    spec = specs.loads(EncodeSpec, spec_json)
    stop = StopFlag()
    install_stop_handlers(stop, announce=False)  # `run` says it, once
    # `run` shares this terminal: the encoder, which hears every DONE, shows the run's progress.
    with EncodeProgress(len(spec.entries)) as progress:
        hooks.result(run_encoder(spec, stop, notice=progress.notice, on_progress=progress.encoded,
                                 on_bound=hooks.ready, on_event=progress.event))
