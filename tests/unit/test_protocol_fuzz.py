"""Fuzzing the wire protocol: whatever arrives, decode answers with a message or ProtocolError, nothing else."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_samples import ENTRY, JOB_ID, SIMPLE_MESSAGES, header_of, make_record

from sdxl_split.shared.protocol import Job, ProtocolError, decode, encode

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


def decode_or_refuse(frames) -> None:
    try:
        decode(frames)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=4))
def test_fuzz_random_frames(frames: list[bytes]) -> None:
    decode_or_refuse(frames)


def _valid_frames() -> list[list[bytes]]:
    return [encode(m) for m in SIMPLE_MESSAGES] + [encode(Job.build(JOB_ID, 1, ENTRY, make_record(ENTRY, seq=4)))]


VALID = _valid_frames()


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_mutated_messages(frames: list[bytes], data) -> None:
    frames = list(frames)
    index = data.draw(st.integers(0, len(frames) - 1))
    target = bytearray(frames[index])
    action = data.draw(st.sampled_from(["flip", "truncate", "insert", "drop_frame", "add_frame"]))
    if action == "flip" and target:
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(target) - 1))
            target[pos] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        del target[data.draw(st.integers(0, len(target))):]
    elif action == "insert":
        pos = data.draw(st.integers(0, len(target)))
        target[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    frames[index] = bytes(target)
    if action == "drop_frame":
        frames.pop(index)
    elif action == "add_frame":
        frames.append(data.draw(st.binary(max_size=64)))
    decode_or_refuse(frames)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_spliced_json_values(frames: list[bytes], data) -> None:
    header = header_of(frames)
    target = header
    # Walk into nested objects/lists (entry, images) so inner fields get hit too.
    while True:
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        if isinstance(target[key], (dict, list)) and target[key] and data.draw(st.booleans()):
            target = target[key]
            continue
        if data.draw(st.booleans()):
            target[key] = data.draw(JSON_VALUES)
        elif isinstance(target, dict):
            del target[key]
        break
    if isinstance(target, dict) and data.draw(st.booleans()):
        target[data.draw(st.text(max_size=10))] = data.draw(JSON_VALUES)
    spliced = [json.dumps(header, ensure_ascii=data.draw(st.booleans())).encode("utf-8", "surrogatepass"),
               *frames[1:]]
    decode_or_refuse(spliced)


def test_deeply_nested_safetensors_header_is_a_protocol_error() -> None:
    """A crafted header that would blow Python's recursion limit must not escape as RecursionError."""
    from sdxl_split.shared import protocol as p

    body = b"[" * 5000 + b"]" * 5000
    payload = struct.pack("<Q", len(body)) + body
    header = json.dumps({"proto": "sdxl-split", "v": 3, "type": "JOB", "job_id": "a" * 64, "attempt": 1,
                         "embedding_key": "b" * 64, "entry": {"line": 1, "prompt": "x", "prompt_2": None,
                         "negative_prompt": None, "negative_prompt_2": None, "seed": None, "count": None,
                         "id": None}}).encode()
    with pytest.raises(p.ProtocolError):
        p.decode([header, payload])
