"""What an embedding is encoded with, and the cache key that follows from it. No torch here: `run`'s parent,
which only plans the work, computes keys without paying for importing it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sdxl_split.shared.loras import LoraUse
from sdxl_split.shared.models.resolve import TEXT_COMPONENTS, ModelSource, fingerprint, model_index
from sdxl_split.shared.prompts import SYNTAXES, PromptEntry

SCHEMA = "sdxl-split/embeddings"
# 3: settings carry the prompt syntax and its compiler; embeddings may be 77*k tokens long.
SCHEMA_VERSION = 3
TEXT_FIELDS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
# A compiled prompt is up to MAX_CHUNKS chunks of CLIP's CHUNK_LEN tokens (BOS, 75, EOS).
CHUNK_LEN = 77
MAX_CHUNKS = 8
# diffusers' clip_skip: final CLIP layers skipped. SDXL's CLIP-L has 12; a model may have fewer (checked on load).
MAX_CLIP_SKIP = 10
# A1111's "Clip skip" (CLIP_stop_at_last_layers) for no clip skip here: 1 and 2 both read SDXL's own penultimate
# layer (as A1111 and ComfyUI read it), each one past 2 skips one more, which is diffusers' clip_skip.
A1111_CLIP_SKIP_BASE = 2


@dataclass(frozen=True)
class EncodingSettings:
    """Everything besides the prompt texts that changes the tensors; part of every cache key."""

    fingerprint: str
    clip_skip: int | None
    dtype: str
    force_zeros: bool
    # How the texts were read (shared.prompts.SYNTAXES), and the version of whatever compiled them: a new
    # compiler never serves tensors an older one made.
    syntax: str = "plain"
    compiler: str | None = None
    # The text-encoder halves of the LoRAs applied (file hash and scale), and the textual inversions the texts
    # use: change either and the key changes, so a cache never serves another LoRA's embeddings.
    loras: tuple[LoraUse, ...] = ()
    inversions: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}")
        if self.syntax not in SYNTAXES:
            raise ValueError(f"syntax must be one of {SYNTAXES}")

    def for_entry(self, entry: PromptEntry, extras=None) -> EncodingSettings:
        """The settings one line is encoded with: its own syntax (JSONL `syntax`) over the run's, and the LoRAs and
        inversions it uses (prompt_extras.Extras)."""
        syntax = entry.syntax or self.syntax
        loras = extras.text_uses if extras is not None else ()
        inversions = extras.inversions if extras is not None else ()
        return replace(self, syntax=syntax, compiler=compiler_version(syntax), loras=loras, inversions=inversions)


# Bumped whenever the a1111/comfy compiler would produce other tensors for the same text. 2: A1111's weights limited
# only at the end (zero and negative ones allowed); comfy read as ComfyUI reads it.
CHUNK_COMPILER_VERSION = "2"


def compiler_version(syntax: str) -> str | None:
    if syntax == "plain":
        return None
    if syntax == "compel":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"compel-{version('compel')}"
        except PackageNotFoundError:
            return "compel-missing"
    return f"{syntax}-{CHUNK_COMPILER_VERSION}"


def entry_key(entry: PromptEntry, settings: EncodingSettings, extras=None) -> str:
    """The cache key of one prompt-file line under a run's settings (texts as written, tags and all)."""
    return embedding_key(entry.texts(), settings.for_entry(entry, extras))


def encoding_settings(source: ModelSource, cache_dir: Path, dtype: str, clip_skip: int | None,
                      syntax: str = "plain") -> EncodingSettings:
    """The settings a model and the encoding options give, as every cache key and lookup must see them."""
    # diffusers reads hidden_states[-(clip_skip + 2)]: 0 is the same layer as no clip skip, so one key.
    return EncodingSettings(
        fingerprint=fingerprint(source, TEXT_COMPONENTS, cache_dir),
        clip_skip=clip_skip or None,
        dtype=dtype,
        force_zeros=bool(model_index(source).get("force_zeros_for_empty_prompt", True)),
        syntax=syntax,
        compiler=compiler_version(syntax),
    )


def embedding_key(texts: dict[str, str | None], settings: EncodingSettings) -> str:
    """sha256 over the schema, model fingerprint, all four texts and the encoding settings."""
    payload = {"schema": SCHEMA, "version": SCHEMA_VERSION, **asdict(settings)}
    payload.update({name: texts.get(name) for name in TEXT_FIELDS})
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
