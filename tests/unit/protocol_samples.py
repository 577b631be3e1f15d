"""Messages and records the protocol tests share: valid examples to round-trip, refuse when broken, and fuzz."""

from __future__ import annotations

import json

import torch

from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings, embedding_key
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.protocol import Bye, Dead, Done, Error, Heartbeat, ImageDone, Ready

JOB_ID = "ab" * 32
SHA = "0123456789abcdef" * 4


def make_record(entry: PromptEntry, *, seq: int = 77, width: int = 96, pooled: int = 64,
                dtype: torch.dtype = torch.float32, settings_dtype: str = "fp32") -> Embeddings:
    settings = EncodingSettings(fingerprint="f" * 64, clip_skip=None, dtype=settings_dtype, force_zeros=False)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "prompt_embeds": torch.randn(1, seq, width, generator=gen).to(dtype),
        "negative_prompt_embeds": torch.randn(1, seq, width, generator=gen).to(dtype),
        "pooled_prompt_embeds": torch.randn(1, pooled, generator=gen).to(dtype),
        "negative_pooled_prompt_embeds": torch.randn(1, pooled, generator=gen).to(dtype),
    }
    texts = entry.texts()
    return Embeddings(key=embedding_key(texts, settings), texts=texts, settings=settings, tensors=tensors)


ENTRY = PromptEntry(line=3, prompt="a red fox", negative_prompt="blurry", seed=42, count=2, id="fox")


def header_of(frames: list[bytes]) -> dict:
    return json.loads(frames[0])


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    header = header_of(frames)
    header.update(changes)
    return [json.dumps(header).encode(), *frames[1:]]


SIMPLE_MESSAGES = [
    Ready(credits=2, worker="gpu-box-1", pid=1234, device="cuda:0"),
    Done(job_id=JOB_ID, attempt=2, images=(ImageDone("fox-0123.png", SHA), ImageDone("fox-4567.png", SHA)),
         seconds=3.5),
    Done(job_id=JOB_ID, attempt=1, images=(), seconds=0.0),
    Error(job_id=JOB_ID, attempt=3, reason="CUDA out of memory ☹"),
    Error(job_id=JOB_ID, attempt=1, reason="no space left on device", scope="denoiser"),
    Heartbeat(),
    Dead(reason="model failed to load"),
    Bye(reason=""),
    Bye(reason="shutting down"),
]
