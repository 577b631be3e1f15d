"""One encode pass over some prompts: cache hits first, then misses in batches; each record goes to a sink the
moment it exists. The model thread runs it for the socket loop (encoder_loop.py); Ray runs it as a stage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING

from sdxl_split.shared.embedding_cache import Bad, EmbeddingCache, Hit
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings, entry_key
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.prompt_extras import Extras
from sdxl_split.shared.prompts import PromptEntry

if TYPE_CHECKING:  # diffusers loads only when some prompt actually needs encoding
    from sdxl_split.encoder_service.text_side import EncodedPrompt, TextSide

# Called with every entry whose embeddings are ready, the exact bytes that are cached (and sent), and the UNet
# halves of its LoRAs.
Sink = Callable[[PromptEntry, Embeddings, bytes, tuple], None]
# Shown when CLIP cuts a prompt, so a user learns which syntax keeps the rest.
_KEEP_IT = "a chunking --prompt-syntax such as a1111 keeps it"


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


@dataclass(frozen=True)
class EncodeContext:
    """What every encode call of one run shares."""

    settings: EncodingSettings
    cache: EmbeddingCache
    meter: MemoryMeter
    # 1 keeps the tensors bit-identical to diffusers' one-prompt encode_prompt.
    batch_size: int = 1
    # The model's text widths: a cached record of another width is re-encoded, not served.
    widths: tuple[int, int] | None = None
    # Resolves a line's LoRAs and inversions (prompt_extras.ExtrasResolver.resolve); by default a line has none.
    extras_of: Callable[[PromptEntry], Extras] = Extras
    warn: Callable[[str], None] = lambda message: None


def _encoded(misses: list[tuple[str, Extras]], text_side: TextSide, context: EncodeContext,
             should_stop: Callable[[], bool]) -> Iterator[tuple[str, Extras, EncodedPrompt]]:
    """(key, extras, encoded) for each miss. Plain prompts go in batches that share their LoRAs and their negative
    mode (diffusers zeroes negatives per call); compiled syntaxes one prompt at a time. Before each forward the
    text side takes on exactly that prompt's LoRAs, so none leaks into the next."""
    from sdxl_split.encoder_service.prompt_compiler import PromptTooLong

    settings = context.settings

    def same_call(item: tuple[str, Extras]) -> tuple:
        extras = item[1]
        return extras.entry.negative_prompt is None, tuple((lora.sha256, scale) for lora, scale in extras.text_loras)

    plain = sorted(((k, x) for k, x in misses if settings.for_entry(x.entry).syntax == "plain"), key=same_call)
    for _, same in groupby(plain, key=same_call):
        same = list(same)
        for start in range(0, len(same), context.batch_size):
            if should_stop():
                return
            batch = same[start : start + context.batch_size]
            text_side.use_loras(batch[0][1].text_loras)
            yield from ((key, extras, result) for (key, extras), result in
                        zip(batch, text_side.encode([x.entry for _, x in batch], settings.clip_skip)))
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
            raise UserError(f"line {extras.entry.line}: the prompt compiles to {err}; shorten it") from None


def _group(entries: list[PromptEntry], context: EncodeContext) -> dict[str, list[tuple[PromptEntry, Extras]]]:
    """Lines by cache key: lines that ask for the same embeddings are encoded once."""
    by_key: dict[str, list[tuple[PromptEntry, Extras]]] = {}
    for entry in entries:
        extras = context.extras_of(entry)
        by_key.setdefault(entry_key(entry, context.settings, extras), []).append((entry, extras))
    return by_key


def run_encode(entries: list[PromptEntry], context: EncodeContext, load_text_side: Callable[[], TextSide],
               sink: Sink, on_progress: Callable[[int], None] = lambda n: None,
               should_stop: Callable[[], bool] = lambda: False) -> EncodeStats:
    """Deliver every entry's record to `sink`: from the cache when it holds a valid one, else encoded (the text
    side is loaded only then)."""
    started = time.perf_counter()
    stats = EncodeStats(prompts=len(entries))
    by_key = _group(entries, context)
    stats.unique = len(by_key)

    def deliver(key: str, record: Embeddings, data: bytes) -> None:
        for entry, extras in by_key[key]:
            sink(entry, record, data, extras.unet_loras)
        on_progress(len(by_key[key]))

    misses: list[tuple[str, Extras]] = []
    for key, group in by_key.items():
        found = context.cache.lookup(key, context.widths)
        if isinstance(found, Hit):
            stats.hits += 1
            deliver(key, found.record, found.data)
            continue
        if isinstance(found, Bad):
            stats.bad_cache_files += 1
            stats.problems.append(found.problem)
            context.warn(f"bad cache file, re-encoding: {found.problem}")
        misses.append((key, group[0][1]))
    if misses:
        _encode_misses(misses, by_key, context, load_text_side, deliver, stats, should_stop)
    stats.seconds = time.perf_counter() - started
    return stats


def _encode_misses(misses: list[tuple[str, Extras]], by_key: dict, context: EncodeContext,
                   load_text_side: Callable[[], TextSide], deliver: Callable[[str, Embeddings, bytes], None],
                   stats: EncodeStats, should_stop: Callable[[], bool]) -> None:
    with context.meter.phase("load"):
        text_side = load_text_side()
    stats.models_loaded = True
    with context.meter.phase("encode"):
        for key, extras, encoded in _encoded(misses, text_side, context, should_stop):
            entry = by_key[key][0][0]
            for name, tail in encoded.dropped.items():
                shown = tail if len(tail) <= 120 else tail[:120] + "..."
                context.warn(f"line {entry.line}: {name} is longer than CLIP's 77 tokens; dropped: {shown!r} "
                             f"({_KEEP_IT})")
            if not all(bool(tensor.isfinite().all()) for tensor in encoded.tensors.values()):
                # Cached, it would be refused on every read and encoded again, forever.
                raise UserError(f"line {entry.line}: the text encoders made NaN or Inf embeddings; a LoRA or a "
                                "textual inversion it uses holds NaN or huge weights")
            record = Embeddings(key=key, texts=entry.texts(), settings=context.settings.for_entry(entry, extras),
                                tensors=encoded.tensors, truncated=bool(encoded.dropped))
            stats.truncated += int(record.truncated)
            data = context.cache.store(record)
            stats.encoded += 1
            deliver(key, record, data)
