"""Embedding records refuse non-finite values in every dtype."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from protocol_samples import ENTRY, make_record

from sdxl_split.shared.embeddings import TENSOR_NAMES, EmbeddingFormatError, Embeddings, decode_embeddings

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def record_in(dtype: str) -> Embeddings:
    return make_record(ENTRY, dtype=DTYPES[dtype], settings_dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", TENSOR_NAMES)
def test_a_record_holding_nan_or_inf_is_refused(dtype: str, value: float, name: str) -> None:
    record = record_in(dtype)
    tensors = {k: v.clone() for k, v in record.tensors.items()}
    tensors[name].view(-1)[-1] = value  # the last value: a check that stops early would miss it
    tampered = replace(record, tensors=tensors).to_bytes()  # its digest is right: only the values are wrong
    with pytest.raises(EmbeddingFormatError, match="NaN or Inf"):
        decode_embeddings(tampered)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_extremes_pass(dtype: str) -> None:
    record = record_in(dtype)
    info = torch.finfo(DTYPES[dtype])
    tensors = {k: v.clone() for k, v in record.tensors.items()}
    tensors["prompt_embeds"].view(-1)[:4] = torch.tensor([info.max, -info.max, info.tiny, -0.0])
    decoded = decode_embeddings(replace(record, tensors=tensors).to_bytes())
    assert torch.equal(decoded.tensors["prompt_embeds"], tensors["prompt_embeds"])
