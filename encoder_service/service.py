"""The encoder as a service: one frozen spec in (prompts, model, settings, link), one summary out. `encode` and
`run`'s encoder child both call `run_encoder`; notices and progress go to callbacks."""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq

from sdxl_split.encoder_service.journal import Journal
from sdxl_split.encoder_service.spec import EncodeSpec
from sdxl_split.encoder_service.streaming import run_streaming_encode
from sdxl_split.shared.devices import cuda_index
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.resolve import text_widths
from sdxl_split.shared.threads import use_threads

Notice = Callable[[str], None]


def run_encoder(spec: EncodeSpec, stop: threading.Event, notice: Notice,
                on_progress: Callable[[int], None] = lambda n: None,
                on_bound: Callable[[], None] = lambda: None,
                on_event: Callable[[str, str, dict], None] = lambda name, work_id, fields: None) -> dict:
    """Encode (or read from the cache) every prompt, stream the jobs to denoisers, and summarise."""
    config = spec.config
    use_threads(config.threads)
    extras = spec.extras.resolver(spec.cache_dir)
    cache = EmbeddingCache(spec.cache_dir / "embeddings")
    journal = Journal(spec.journal_path)
    meter = MemoryMeter(cuda_device=cuda_index(config.device))

    def load():
        from sdxl_split.encoder_service.text_side import TextSide

        use_threads(config.threads)  # this is the text-side thread, where every forward pass runs

        notice(f"loading text encoders of {spec.source.description} on {config.device} ({config.dtype})")
        return TextSide(spec.source, config.device, config.dtype, inversions=extras.inversions)

    try:
        result = run_streaming_encode(
            list(spec.entries), spec.settings, cache, load, meter, spec.link, journal, spec.wait_s, stop, notice,
            batch_size=config.batch_size, on_progress=on_progress, throttle_s=spec.throttle_s, on_bound=on_bound,
            widths=text_widths(spec.source), on_event=on_event, extras_of=extras.resolve)
        memory = meter.summary()
    except zmq.ZMQError as err:
        raise UserError(f"cannot listen on {spec.link.endpoint} ({err.strerror}); is another encoder running? "
                        "pass --bind with another endpoint") from None
    finally:
        meter.close()
    stats = result.encode
    stats.skipped_lines = spec.skipped_lines
    return {"stats": stats.as_dict(), "memory": memory, "cache_dir": str(cache.root), "journal": str(journal.path),
            "model": spec.source.description, "jobs": result.jobs, "already_done": result.already_done,
            "done": result.done, "dead_lettered": result.dead_lettered, "abandoned": result.abandoned,
            "denoisers_attached": result.denoisers_attached, "interrupted": result.interrupted}


def child_main(hooks, spec_json: str) -> None:
    """`run`'s encoder process (shared.processes.child_process): readiness is "bound", the result the summary."""
    from sdxl_split.encoder_service.progress import EncodeProgress
    from sdxl_split.shared import specs
    from sdxl_split.shared.processes import install_stop_handlers
    from sdxl_split.shared.wakeup import StopFlag

    spec = specs.loads(EncodeSpec, spec_json)
    stop = StopFlag()
    install_stop_handlers(stop)
    # `run` shares this terminal: the encoder, which hears every DONE, shows the run's progress.
    with EncodeProgress(len(spec.entries)) as progress:
        hooks.result(run_encoder(spec, stop, notice=progress.notice, on_progress=progress.encoded,
                                 on_bound=hooks.ready, on_event=progress.event))
