"""Embedding records refuse non-finite values in every dtype, and decoding one starts no threads."""

from __future__ import annotations

import os
import subprocess
import sys
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


# A full-size SDXL record (77 x 2048 per prompt, 157k values each side), decoded on a fresh thread of a process whose
# torch runs 2 threads, as a denoiser's socket thread does. Prints the process's thread count before and after.
DECODE_ON_A_SOCKET_THREAD = """
import os, threading, torch
from protocol_samples import ENTRY, make_record
from sdxl_split.shared.embeddings import decode_embeddings
torch.set_num_threads(2)
data = make_record(ENTRY, width=2048, pooled=1280).to_bytes()
counts = []
def socket_thread():
    counts.append(len(os.listdir("/proc/self/task")))
    decode_embeddings(data)
    counts.append(len(os.listdir("/proc/self/task")))
thread = threading.Thread(target=socket_thread)
thread.start()
thread.join()
print(*counts)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_decoding_a_full_size_record_starts_no_openmp_team() -> None:
    """A second OpenMP team in a denoiser (or an encoder) makes libgomp stop spin-waiting, and the model's own
    team slows down: decoding must not start one on the socket thread."""
    here = os.path.dirname(__file__)
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", DECODE_ON_A_SOCKET_THREAD], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split())
    assert after == before, f"decoding started {after - before} thread(s)"
