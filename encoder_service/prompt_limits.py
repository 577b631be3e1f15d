"""Whether each prompt of a file fits a record, checked with the tokenizer alone before any work starts: an a1111 or
comfy prompt compiles to at most MAX_CHUNKS chunks of 75 tokens. No torch here: `run`'s parent runs it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdxl_split.encoder_service.prompt_chunks import Chunker, layout
from sdxl_split.shared.encoding_settings import MAX_CHUNKS
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.prompts import PromptEntry

CHUNKED = ("a1111", "comfy")
# A chunk moved back to a comma still holds 55 tokens, and one character is at most 4 byte-level BPE tokens: a
# text whose BREAKs plus this bound stay within MAX_CHUNKS cannot overflow, and is not tokenized at all.
_MIN_TOKENS_PER_CHUNK = 55
_MAX_TOKENS_PER_CHAR = 4


def _could_overflow(text: str) -> bool:
    return text.count("BREAK") + 1 + _MAX_TOKENS_PER_CHAR * len(text) // _MIN_TOKENS_PER_CHUNK > MAX_CHUNKS


def check_chunk_counts(path: Path, entries: tuple[PromptEntry, ...], default_syntax: str,
                       tokenizer: Callable[[], object]) -> None:
    """Refuse, naming file:line, the first prompt that compiles to more chunks than a record holds; `tokenizer`
    loads the model's tokenizer, called only if some prompt is long enough to need it."""
    chunker = None
    for entry in entries:
        syntax = entry.syntax or default_syntax
        if syntax not in CHUNKED:
            continue
        for name, text in entry.texts().items():
            if not text or not _could_overflow(text):
                continue
            chunker = chunker or Chunker(tokenizer())
            if (count := len(layout(chunker, syntax, text))) > MAX_CHUNKS:
                raise UserError(f"{path}:{entry.line}: {name} compiles to {count} chunks of 75 tokens under "
                                f"--prompt-syntax {syntax}; at most {MAX_CHUNKS} fit: shorten it"
                                f"{' or use fewer BREAKs' if 'BREAK' in text else ''}")
