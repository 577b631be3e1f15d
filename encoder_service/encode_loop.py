"""The encode loop: cache hits first, then misses in batches; each record goes to a sink the moment it exists."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING

from sdxl_split.shared.embedding_cache import Bad, EmbeddingCache, Hit
from sdxl_split.shared.embeddings import Embeddings, EncodingSettings, entry_key
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.prompts import PromptEntry

if TYPE_CHECKING:  # diffusers loads only when some prompt actually needs encoding
    from sdxl_split.encoder_service.text_side import TextSide

# Called with every entry whose embeddings are ready, plus the exact bytes that are cached (and sent).
Sink = Callable[[PromptEntry, Embeddings, bytes], None]


@dataclass
class EncodeStats:
    prompts: int = 0
    unique: int = 0
    hits: int = 0
    encoded: int = 0
    bad_cache_files: int = 0
    truncated: int = 0
    skipped_lines: int = 0
    models_loaded: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def prompts_per_s(self) -> float:
        return self.unique / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "prompts_per_s": self.prompts_per_s}


def _encoded(misses: list[tuple[str, PromptEntry]], text_side: TextSide, settings: EncodingSettings,
             batch_size: int, should_stop: Callable[[], bool], warn: Callable[[str], None]):
    """(key, entry, encoded) for each miss: plain prompts in batches (never mixing prompts with and without a
    negative, since diffusers zeroes negatives per call), compiled syntaxes one prompt at a time."""
    from sdxl_split.encoder_service.prompt_compiler import PromptTooLong

    plain = sorted(((k, e) for k, e in misses if settings.for_entry(e).syntax == "plain"),
                   key=lambda item: item[1].negative_prompt is None)
    for _, same_mode in groupby(plain, key=lambda item: item[1].negative_prompt is None):
        same_mode = list(same_mode)
        for start in range(0, len(same_mode), batch_size):
            if should_stop():
                return
            batch = same_mode[start : start + batch_size]
            for (key, entry), encoded in zip(batch, text_side.encode([e for _, e in batch], settings.clip_skip)):
                yield key, entry, encoded
    for key, entry in misses:
        syntax = settings.for_entry(entry).syntax
        if syntax == "plain":
            continue
        if should_stop():
            return
        try:
            yield key, entry, text_side.encode_compiled(entry, settings.clip_skip, syntax)
        except PromptTooLong as err:
            warn(f"line {entry.line}: skipped: the prompt compiles to {err}")


def run_encode(
    entries: list[PromptEntry],
    settings: EncodingSettings,
    cache: EmbeddingCache,
    load_text_side: Callable[[], TextSide],
    sink: Sink,
    meter: MemoryMeter,
    batch_size: int = 1,
    on_progress: Callable[[int], None] = lambda n: None,
    warn: Callable[[str], None] = lambda message: None,
    should_stop: Callable[[], bool] = lambda: False,
    widths: tuple[int, int] | None = None,
) -> EncodeStats:
    started = time.perf_counter()
    stats = EncodeStats(prompts=len(entries))
    by_key: dict[str, list[PromptEntry]] = {}
    for entry in entries:
        by_key.setdefault(entry_key(entry, settings), []).append(entry)
    stats.unique = len(by_key)

    def deliver(key: str, record: Embeddings, data: bytes) -> None:
        for entry in by_key[key]:
            sink(entry, record, data)
        on_progress(len(by_key[key]))

    misses: list[tuple[str, PromptEntry]] = []
    for key, group in by_key.items():
        found = cache.lookup(key, widths)
        if isinstance(found, Hit):
            stats.hits += 1
            deliver(key, found.record, found.data)
            continue
        if isinstance(found, Bad):
            stats.bad_cache_files += 1
            stats.problems.append(found.problem)
            warn(f"bad cache file, re-encoding: {found.problem}")
        misses.append((key, group[0]))

    if misses:
        with meter.phase("load"):
            text_side = load_text_side()
        stats.models_loaded = True
        with meter.phase("encode"):
            for key, entry, encoded in _encoded(misses, text_side, settings, batch_size, should_stop, warn):
                for name, tail in encoded.dropped.items():
                    shown = tail if len(tail) <= 120 else tail[:120] + "..."
                    warn(f"line {entry.line}: {name} is longer than CLIP's 77 tokens; dropped: {shown!r} (a "
                         "chunking --prompt-syntax such as a1111 keeps it)")
                record = Embeddings(key=key, texts=entry.texts(), settings=settings.for_entry(entry),
                                    tensors=encoded.tensors, truncated=bool(encoded.dropped))
                stats.truncated += int(record.truncated)
                data = cache.store(record)
                stats.encoded += 1
                deliver(key, record, data)
    stats.seconds = time.perf_counter() - started
    return stats
