"""The embedding record: SDXL's four prompt tensors as self-describing safetensors bytes, on disk and on the wire."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sdxl_split.shared.encoding_settings import (  # noqa: F401  (CHUNK_LEN, MAX_CHUNKS: part of the record's bounds)
    CHUNK_LEN,
    DTYPE_NAMES,
    MAX_CHUNKS,
    SCHEMA,
    SCHEMA_VERSION,
    TEXT_FIELDS,
    EncodingSettings,
    embedding_key,
)
from sdxl_split.shared.loras import LoraUse
from sdxl_split.shared.prompts import MAX_TEXT_CHARS, SYNTAXES

# In the order diffusers' encode_prompt returns them.
TENSOR_NAMES = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_ITEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2}
# Bounds that any SDXL-family text side sits well inside; anything bigger is refused before allocating. A
# compiled prompt is up to MAX_CHUNKS chunks of CLIP's 77 tokens.
MAX_SEQ_LEN = CHUNK_LEN * MAX_CHUNKS
MAX_WIDTH = 8192
MAX_HEADER_BYTES = 64 * 1024


# Per dtype: the same-sized integer view and the exponent bits; all of them set means Inf or NaN.
_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
                  torch.bfloat16: (torch.int16, 0x7F80)}


class EmbeddingFormatError(ValueError):
    """Bytes that are not a valid embedding record of this schema."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the raw tensor bytes in schema order: catches a flipped bit the header checks cannot see."""
    digest = hashlib.sha256()
    for name in TENSOR_NAMES:
        digest.update(tensors[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Embeddings:
    key: str
    texts: dict[str, str | None]
    settings: EncodingSettings
    tensors: dict[str, torch.Tensor]
    truncated: bool = False

    def to_bytes(self) -> bytes:
        metadata = {
            "schema": SCHEMA,
            "schema_version": str(SCHEMA_VERSION),
            "key": self.key,
            "texts": json.dumps(self.texts, sort_keys=True, ensure_ascii=False),
            "settings": json.dumps(asdict(self.settings), sort_keys=True),
            "truncated": "true" if self.truncated else "false",
            "tensors_sha256": tensors_digest(self.tensors),
        }
        return st_save({name: self.tensors[name].contiguous() for name in TENSOR_NAMES}, metadata=metadata)

    @property
    def widths(self) -> tuple[int, int]:
        """(hidden width of prompt_embeds, width of the pooled embedding)."""
        return int(self.tensors["prompt_embeds"].shape[-1]), int(self.tensors["pooled_prompt_embeds"].shape[-1])


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    if len(data) < 8:
        raise EmbeddingFormatError("too short to be safetensors")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise EmbeddingFormatError(f"safetensors header length {size} is out of bounds")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise EmbeddingFormatError("safetensors header is not JSON (or nests absurdly deep)") from None
    if not isinstance(header, dict):
        raise EmbeddingFormatError("safetensors header is not an object")
    return header, 8 + size


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise EmbeddingFormatError(f"{what} must be a list of integers")
    return value


def _check_layout(header: dict[str, Any], body_len: int, dtype: str) -> None:
    """Names, dtypes, shapes and offsets, checked against the schema before any tensor is allocated."""
    names = sorted(k for k in header if k != "__metadata__")
    if names != sorted(TENSOR_NAMES):
        raise EmbeddingFormatError(f"tensors are {names}, expected exactly {sorted(TENSOR_NAMES)}")
    shapes = {}
    spans = []
    for name in TENSOR_NAMES:
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != _ST_DTYPES[dtype]:
            raise EmbeddingFormatError(f"{name} must have dtype {_ST_DTYPES[dtype]} as the metadata says")
        shape = _int_list(info.get("shape"), f"{name} shape")
        offsets = _int_list(info.get("data_offsets"), f"{name} offsets")
        if len(offsets) != 2:
            raise EmbeddingFormatError(f"{name} offsets must be [start, end]")
        start, end = offsets
        count = 1
        for dim in shape:
            count *= dim
        if end - start != count * _ITEM_SIZE[info["dtype"]] or start < 0:
            raise EmbeddingFormatError(f"{name} offsets do not match its shape")
        shapes[name] = shape
        spans.append((start, end))
    seq = shapes["prompt_embeds"]
    pooled = shapes["pooled_prompt_embeds"]
    if len(seq) != 3 or seq[0] != 1 or not (1 <= seq[1] <= MAX_SEQ_LEN) or not (1 <= seq[2] <= MAX_WIDTH):
        raise EmbeddingFormatError(f"prompt_embeds shape {seq} is not [1, tokens, width] with at most "
                                   f"{MAX_SEQ_LEN} tokens ({MAX_CHUNKS} chunks of {CHUNK_LEN})")
    if seq[1] % CHUNK_LEN:
        raise EmbeddingFormatError(f"prompt_embeds has {seq[1]} tokens, not whole chunks of {CHUNK_LEN}")
    if len(pooled) != 2 or pooled[0] != 1 or not (1 <= pooled[1] <= MAX_WIDTH):
        raise EmbeddingFormatError(f"pooled_prompt_embeds shape {pooled} is not [1, width]")
    if shapes["negative_prompt_embeds"] != seq or shapes["negative_pooled_prompt_embeds"] != pooled:
        raise EmbeddingFormatError("negative tensors must have the same shapes as the positive ones")
    spans.sort()
    if spans[0][0] != 0 or spans[-1][1] != body_len or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise EmbeddingFormatError("tensor data does not exactly fill the file")


def _metadata(header: dict[str, Any]) -> tuple[str, dict[str, str | None], EncodingSettings, bool]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise EmbeddingFormatError(f"not an {SCHEMA} file")
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise EmbeddingFormatError(f"schema version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    try:
        texts = json.loads(meta["texts"])
        settings_raw = json.loads(meta["settings"])
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError):
        raise EmbeddingFormatError("metadata texts/settings are missing or not JSON") from None
    if not isinstance(texts, dict) or set(texts) != set(TEXT_FIELDS):
        raise EmbeddingFormatError("metadata texts must name exactly the four prompt fields")
    for name, value in texts.items():
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT_CHARS):
            raise EmbeddingFormatError(f"metadata text {name} is not a string of sane length")
    if not isinstance(texts["prompt"], str):
        raise EmbeddingFormatError("metadata prompt must be a string")
    expected = {"fingerprint": str, "clip_skip": (int, type(None)), "dtype": str, "force_zeros": bool,
                "syntax": str, "compiler": (str, type(None)), "loras": list, "inversions": list}
    if not isinstance(settings_raw, dict) or set(settings_raw) != set(expected):
        raise EmbeddingFormatError("metadata settings have the wrong fields")
    for name, kind in expected.items():
        if not isinstance(settings_raw[name], kind) or (name == "clip_skip" and settings_raw[name] is True):
            raise EmbeddingFormatError(f"metadata setting {name} has the wrong type")
    if settings_raw["dtype"] not in DTYPE_NAMES:
        raise EmbeddingFormatError(f"metadata dtype {settings_raw['dtype']!r} is not one of {sorted(DTYPE_NAMES)}")
    if settings_raw["syntax"] not in SYNTAXES:
        raise EmbeddingFormatError(f"metadata syntax {str(settings_raw['syntax'])[:20]!r} is not one of {SYNTAXES}")
    if settings_raw["compiler"] is not None and len(settings_raw["compiler"]) > 64:
        raise EmbeddingFormatError("metadata compiler is not a short version string")
    settings_raw["loras"] = _lora_uses(settings_raw["loras"])
    settings_raw["inversions"] = _inversions(settings_raw["inversions"])
    key = meta.get("key")
    if not isinstance(key, str) or len(key) != 64:
        raise EmbeddingFormatError("metadata key is missing")
    if meta.get("truncated") not in ("true", "false"):
        raise EmbeddingFormatError("metadata truncated must be 'true' or 'false'")
    return key, texts, EncodingSettings(**settings_raw), meta["truncated"] == "true"


def _lora_uses(raw: list) -> tuple[LoraUse, ...]:
    if len(raw) > 16:
        raise EmbeddingFormatError("metadata names more than 16 LoRAs")
    uses = []
    for item in raw:
        # a1111_hash is newer than the schema: a record made before it has none.
        if (not isinstance(item, dict) or not {"name", "sha256", "scale"} <= set(item)
                or not set(item) <= {"name", "sha256", "scale", "a1111_hash"} or not isinstance(item["name"], str)
                or not isinstance(item["sha256"], str) or len(item["sha256"]) != 64
                or not isinstance(item.get("a1111_hash", ""), str) or len(item.get("a1111_hash", "")) > 64
                or isinstance(item["scale"], bool) or not isinstance(item["scale"], (int, float))):
            raise EmbeddingFormatError("metadata loras must be {name, sha256, scale, a1111_hash} objects")
        uses.append(LoraUse(item["name"][:255], item["sha256"], float(item["scale"]), item.get("a1111_hash", "")))
    return tuple(uses)


def _inversions(raw: list) -> tuple[tuple[str, str], ...]:
    if len(raw) > 64 or not all(isinstance(i, list) and len(i) == 2 and all(isinstance(v, str) for v in i)
                                for i in raw):
        raise EmbeddingFormatError("metadata inversions must be [token, sha256] pairs")
    return tuple((token, digest) for token, digest in raw)


def _all_finite(tensor: torch.Tensor) -> bool:
    """torch.isfinite(tensor).all(), read from the bits with numpy. Records are decoded on socket threads, and a
    torch op on a full-size record (157k values) starts an OpenMP team on that thread: with two teams in one
    process, libgomp all but stops spin-waiting and the model's own team slows down (a Ray denoiser with two
    teams rendered at 0.58 s an image against 0.33 with one). numpy starts no threads."""
    as_int, exponent = _EXPONENT_BITS[tensor.dtype]
    bits = tensor.contiguous().view(as_int).numpy()
    return not bool(np.any((bits & exponent) == exponent))


def decode_embeddings(data: bytes, expected_key: str | None = None) -> Embeddings:
    """Validate everything (layout, metadata, key) and only then materialise the tensors."""
    header, body_start = _header(data)
    key, texts, settings, truncated = _metadata(header)
    _check_layout(header, len(data) - body_start, settings.dtype)
    if embedding_key(texts, settings) != key:
        raise EmbeddingFormatError("key in metadata does not match the texts and settings")
    if expected_key is not None and key != expected_key:
        raise EmbeddingFormatError(f"holds key {key[:12]}..., expected {expected_key[:12]}...")
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types for malformed bodies
        raise EmbeddingFormatError(f"safetensors body is unreadable: {err}") from None
    if tensors_digest(tensors) != header["__metadata__"].get("tensors_sha256"):
        raise EmbeddingFormatError("tensor data does not match its recorded sha256 (corrupted)")
    if not all(_all_finite(tensors[name]) for name in TENSOR_NAMES):
        raise EmbeddingFormatError("tensors hold NaN or Inf")
    return Embeddings(key=key, texts=texts, settings=settings, tensors=tensors, truncated=truncated)
