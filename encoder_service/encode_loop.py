"""The encode loop: cache hits first, then misses in batches; each record goes to a sink the moment it exists."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING

from sdxl_split.shared.embedding_cache import Bad, EmbeddingCache, Hit
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings, entry_key
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.prompt_extras import Extras
from sdxl_split.shared.prompts import PromptEntry

if TYPE_CHECKING:  # diffusers loads only when some prompt actually needs encoding
    from sdxl_split.encoder_service.text_side import TextSide

# Called with every entry whose embeddings are ready, the exact bytes that are cached (and sent), and the UNet
# halves of its LoRAs.
Sink = Callable[[PromptEntry, Embeddings, bytes, tuple], None]


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


def _encoded(misses: list[tuple[str, Extras]], text_side: TextSide, settings: EncodingSettings,
             batch_size: int, should_stop: Callable[[], bool], warn: Callable[[str], None]):
    """(key, extras, encoded) for each miss. Plain prompts go in batches that share their LoRAs and their negative
    mode (diffusers zeroes negatives per call); compiled syntaxes one prompt at a time. Before each forward the
    text side takes on exactly that prompt's LoRAs, so none leaks into the next."""
    from sdxl_split.encoder_service.prompt_compiler import PromptTooLong

    def lora_set(extras: Extras) -> tuple:
        return tuple((lora.sha256, scale) for lora, scale in extras.text_loras)

    plain = sorted(((k, x) for k, x in misses if settings.for_entry(x.entry).syntax == "plain"),
                   key=lambda item: (item[1].entry.negative_prompt is None, lora_set(item[1])))
    for _, same in groupby(plain, key=lambda item: (item[1].entry.negative_prompt is None, lora_set(item[1]))):
        same = list(same)
        for start in range(0, len(same), batch_size):
            if should_stop():
                return
            batch = same[start : start + batch_size]
            text_side.use_loras(batch[0][1].text_loras)
            encoded = text_side.encode([x.entry for _, x in batch], settings.clip_skip)
            for (key, extras), result in zip(batch, encoded):
                yield key, extras, result
    for key, extras in misses:
        syntax = settings.for_entry(extras.entry).syntax
        if syntax == "plain":
            continue
        if should_stop():
            return
        try:
            text_side.use_loras(extras.text_loras)
            yield key, extras, text_side.encode_compiled(extras.entry, settings.clip_skip, syntax)
        except PromptTooLong as err:
            warn(f"line {extras.entry.line}: skipped: the prompt compiles to {err}")


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
    extras_of: Callable[[PromptEntry], Extras] = Extras,
) -> EncodeStats:
    """`extras_of` resolves a line's LoRAs and inversions (prompt_extras.ExtrasResolver.resolve); by default a
    line has none."""
    started = time.perf_counter()
    stats = EncodeStats(prompts=len(entries))
    by_key: dict[str, list[tuple[PromptEntry, Extras]]] = {}
    for entry in entries:
        extras = extras_of(entry)
        by_key.setdefault(entry_key(entry, settings, extras), []).append((entry, extras))
    stats.unique = len(by_key)

    def deliver(key: str, record: Embeddings, data: bytes) -> None:
        for entry, extras in by_key[key]:
            sink(entry, record, data, extras.unet_loras)
        on_progress(len(by_key[key]))

    misses: list[tuple[str, Extras]] = []
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
        misses.append((key, group[0][1]))

    if misses:
        with meter.phase("load"):
            text_side = load_text_side()
        stats.models_loaded = True
        with meter.phase("encode"):
            for key, extras, encoded in _encoded(misses, text_side, settings, batch_size, should_stop, warn):
                entry = by_key[key][0][0]
                for name, tail in encoded.dropped.items():
                    shown = tail if len(tail) <= 120 else tail[:120] + "..."
                    warn(f"line {entry.line}: {name} is longer than CLIP's 77 tokens; dropped: {shown!r} (a "
                         "chunking --prompt-syntax such as a1111 keeps it)")
                record = Embeddings(key=key, texts=entry.texts(), settings=settings.for_entry(entry, extras),
                                    tensors=encoded.tensors, truncated=bool(encoded.dropped))
                stats.truncated += int(record.truncated)
                data = cache.store(record)
                stats.encoded += 1
                deliver(key, record, data)
    stats.seconds = time.perf_counter() - started
    return stats
