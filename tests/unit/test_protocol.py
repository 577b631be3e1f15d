"""The wire protocol: every message round-trips, and anything malformed is refused with ProtocolError only."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from protocol_samples import ENTRY, JOB_ID, SHA, SIMPLE_MESSAGES, header_of, make_record, with_header

from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.protocol import (
    DEFAULT_MAX_PAYLOAD,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Bye,
    Dead,
    Done,
    Error,
    Heartbeat,
    ImageDone,
    Job,
    ProtocolError,
    Ready,
    decode,
    encode,
)


@pytest.fixture(scope="module")
def job() -> Job:
    return Job.build(JOB_ID, 1, ENTRY, make_record(ENTRY))


@pytest.mark.parametrize("msg", SIMPLE_MESSAGES, ids=lambda m: type(m).__name__)
def test_simple_messages_round_trip(msg) -> None:
    frames = encode(msg)
    assert len(frames) == 1
    header = header_of(frames)
    assert header["proto"] == "sdxl-split" and header["v"] == PROTOCOL_VERSION and header["type"] == msg.TYPE
    assert decode(frames) == msg


def test_job_round_trips_with_real_embeddings(job: Job) -> None:
    frames = encode(job)
    assert len(frames) == 2 and frames[1] == job.payload
    assert header_of(frames)["embedding_key"] == job.record.key
    got = decode(frames)
    assert isinstance(got, Job)
    assert (got.job_id, got.attempt, got.entry, got.payload) == (JOB_ID, 1, ENTRY, job.payload)
    assert got.record.key == job.record.key and got.record.texts == ENTRY.texts()
    for name, tensor in job.record.tensors.items():
        assert got.record.tensors[name].dtype == torch.float32
        assert torch.equal(got.record.tensors[name], tensor)


def test_job_build_reuses_given_payload(job: Job) -> None:
    again = Job.build(JOB_ID, 2, ENTRY, job.record, job.payload)
    assert again.payload is job.payload and decode(encode(again)).attempt == 2


def test_done_seconds_int_becomes_float() -> None:
    frames = with_header(encode(Done(JOB_ID, 1, (), 1.5)), seconds=2)
    assert decode(frames).seconds == 2.0 and isinstance(decode(frames).seconds, float)


def expect_refused(frames, match: str | None = None, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frames, **kw)
    return info.value


def test_rejects_pickle_header_and_payload(job: Job) -> None:
    blob = pickle.dumps({"a": 1})
    expect_refused([blob], "not UTF-8 JSON")
    expect_refused([encode(job)[0], blob], "not a valid embedding record")


@pytest.mark.parametrize("frames", [
    [b""], [b"\x00\xff\xfe"], [b"garbage"], [b"[1, 2]"], [b'"READY"'], [b"null"], [b"{" * 5000],
    [b"[" * 50000 + b"]" * 50000], [b'{"proto": NaN}'], [b"1" * 5000],
    [], [b"{}", b"", b""], ["not bytes"], [b'{"proto":"sdxl-split","proto":"sdxl-split","v":1,"type":"HEARTBEAT"}'],
])
def test_rejects_garbage(frames) -> None:
    expect_refused(frames)


def test_rejects_non_list() -> None:
    expect_refused(b"just bytes")
    expect_refused(None)


def test_rejects_unknown_type_and_foreign_protocol() -> None:
    good = encode(Heartbeat())
    expect_refused(with_header(good, type="SHUTDOWN"), "unknown message type")
    expect_refused(with_header(good, type=None), "unknown message type")
    expect_refused(with_header(good, proto="other"), "not an sdxl-split message")


@pytest.mark.parametrize("version", [1, 2, 0, "3", True, None, 1.5])
def test_rejects_other_protocol_versions_naming_them(version) -> None:
    err = expect_refused(with_header(encode(Heartbeat()), v=version), "protocol version")
    assert repr(str(version)) in str(err)


def test_rejects_oversized_header() -> None:
    frames = with_header(encode(Bye("x")), reason="x" * (MAX_HEADER_BYTES + 1))
    expect_refused(frames, "header is")
    with pytest.raises(ProtocolError):
        encode(Job.build(JOB_ID, 1, PromptEntry(line=0, prompt="p", id="i" * MAX_HEADER_BYTES),
                         make_record(PromptEntry(line=0, prompt="p"))))


def test_rejects_oversized_payload_before_decoding_it(job: Job, monkeypatch) -> None:
    def must_not_run(*a, **k):
        raise AssertionError("payload decoded despite being over the limit")

    monkeypatch.setattr("sdxl_split.shared.protocol.decode_embeddings", must_not_run)
    expect_refused(encode(job), "payload is", max_payload_bytes=len(job.payload) - 1)
    expect_refused([encode(job)[0], b"\x00" * (DEFAULT_MAX_PAYLOAD + 1)], "payload is")
    with pytest.raises(ProtocolError, match="payload is"):
        encode(job, max_payload_bytes=100)


def test_rejects_wrong_frame_counts(job: Job) -> None:
    expect_refused([encode(job)[0]], "JOB must be 2 frames")
    expect_refused([*encode(Heartbeat()), b"extra"], "HEARTBEAT must be 1 frame")


@pytest.mark.parametrize("kind", ["shape", "dtype", "width"])
def test_rejects_job_with_wrong_tensors(kind: str) -> None:
    if kind == "shape":
        record = make_record(ENTRY)
        bad = dict(record.tensors, prompt_embeds=torch.zeros(77, 96))
    elif kind == "dtype":
        # fp16 tensors in a record whose metadata says fp32
        record = make_record(ENTRY)
        bad = {k: v.half() for k, v in record.tensors.items()}
    else:
        record = make_record(ENTRY)
        bad = dict(record.tensors, negative_prompt_embeds=torch.zeros(1, 77, 95))
    tampered = Embeddings(key=record.key, texts=record.texts, settings=record.settings, tensors=bad)
    frames = encode(Job.build(JOB_ID, 1, ENTRY, record, tampered.to_bytes()))
    expect_refused(frames, "not a valid embedding record")


def test_rejects_embedding_key_mismatch(job: Job) -> None:
    expect_refused(with_header(encode(job), embedding_key="0" * 64), "not a valid embedding record")
    other_entry = PromptEntry(line=1, prompt="a blue fox")
    other = Job.build(JOB_ID, 1, other_entry, make_record(other_entry))
    # header and payload agree with each other, but not with the entry's texts
    expect_refused(with_header(encode(other), entry=header_of(encode(job))["entry"]), "entry texts")


def test_rejects_truncated_or_flipped_payload(job: Job) -> None:
    header, payload = encode(job)
    expect_refused([header, payload[: len(payload) // 2]])
    expect_refused([header, struct.pack("<Q", 2**60) + payload[8:]])
    expect_refused([header, b""])


@pytest.mark.parametrize("msg", [m for m in SIMPLE_MESSAGES if not isinstance(m, Heartbeat)],
                         ids=lambda m: type(m).__name__)
def test_rejects_extra_and_missing_fields(msg) -> None:
    frames = encode(msg)
    expect_refused(with_header(frames, extra=1), "unknown field 'extra'")
    header = header_of(frames)
    for name in list(header):
        if name in ("proto", "v", "type"):
            continue
        trimmed = {k: v for k, v in header.items() if k != name}
        expect_refused([json.dumps(trimmed).encode()], f"missing field '{name}'")


def test_rejects_extra_and_missing_entry_and_image_fields(job: Job) -> None:
    frames = encode(job)
    entry = header_of(frames)["entry"]
    expect_refused(with_header(frames, entry={**entry, "style": "oil"}), "unknown field 'style'")
    expect_refused(with_header(frames, entry={k: v for k, v in entry.items() if k != "seed"}), "missing")
    done = encode(Done(JOB_ID, 1, (ImageDone("a.png", SHA),), 1.0))
    expect_refused(with_header(done, images=[{"file": "a.png", "sha256": SHA, "x": 1}]), "unknown field")
    expect_refused(with_header(done, images=[{"file": "a.png"}]), "missing field")


@pytest.mark.parametrize("msg,field,value", [
    (Ready(1, "w", 1, "cpu"), "credits", True),
    (Ready(1, "w", 1, "cpu"), "pid", False),
    (Ready(1, "w", 1, "cpu"), "credits", 1.0),
    (Ready(1, "w", 1, "cpu"), "credits", "1"),
    (Error(JOB_ID, 1, "r"), "attempt", True),
    (Done(JOB_ID, 1, (), 1.0), "seconds", True),
])
def test_rejects_bool_and_other_non_ints(msg, field, value) -> None:
    expect_refused(with_header(encode(msg), **{field: value}), field)


def test_rejects_bool_seed_and_count_in_entry(job: Job) -> None:
    frames = encode(job)
    entry = header_of(frames)["entry"]
    for field in ("seed", "count", "line"):
        expect_refused(with_header(frames, entry={**entry, field: True}), f"entry.{field}")


@pytest.mark.parametrize("msg,field,value", [
    (Ready(1, "w", 1, "cpu"), "credits", 0),
    (Ready(1, "w", 1, "cpu"), "credits", 65),
    (Ready(1, "w", 1, "cpu"), "pid", -1),
    (Ready(1, "w", 1, "cpu"), "worker", ""),
    (Ready(1, "w", 1, "cpu"), "worker", "w" * 129),
    (Ready(1, "w", 1, "cpu"), "device", "d" * 65),
    (Error(JOB_ID, 1, "r"), "attempt", 0),
    (Error(JOB_ID, 1, "r"), "job_id", "AB" * 32),
    (Error(JOB_ID, 1, "r"), "job_id", "ab" * 31),
    (Error(JOB_ID, 1, "r"), "job_id", "../../etc/passwd"),
    (Error(JOB_ID, 1, "r"), "reason", "r" * 2001),
    (Error(JOB_ID, 1, "r"), "reason", ""),
    (Dead("r"), "reason", ""),
    (Dead("r"), "reason", 5),
    (Done(JOB_ID, 1, (), 1.0), "seconds", -0.5),
    (Done(JOB_ID, 1, (), 1.0), "seconds", 1e400),
    (Done(JOB_ID, 1, (), 1.0), "images", [{"file": "a.png", "sha256": SHA}] * 2),
    (Done(JOB_ID, 1, (), 1.0), "images", [{"file": f"{i}.png", "sha256": SHA} for i in range(65)]),
    (Done(JOB_ID, 1, (), 1.0), "images", {"file": "a.png", "sha256": SHA}),
    (Done(JOB_ID, 1, (), 1.0), "images", ["a.png"]),
])
def test_rejects_out_of_range_values(msg, field, value) -> None:
    expect_refused(with_header(encode(msg), **{field: value}))


@pytest.mark.parametrize("name", ["../x.png", "a/b.png", "a\\b.png", "a\x00.png", ".", "..", "", "x" * 256,
                                  "\u00e9" * 200, "\ud800.png"])
def test_rejects_unsafe_image_file_names(name: str) -> None:
    frames = with_header(encode(Done(JOB_ID, 1, (), 1.0)), images=[{"file": name, "sha256": SHA}])
    expect_refused(frames)
    with pytest.raises(ProtocolError):
        ImageDone(name, SHA)


def test_rejects_bad_entries(job: Job) -> None:
    frames = encode(job)
    entry = header_of(frames)["entry"]
    for change in ({"prompt": ""}, {"prompt": "   "}, {"prompt": None}, {"seed": -1}, {"seed": 2**63},
                   {"count": 0}, {"count": 65}, {"line": -1}, {"id": 7}, {"prompt_2": ["x"]}):
        expect_refused(with_header(frames, entry={**entry, **change}), "entry")
    expect_refused(with_header(frames, entry=[entry]), "entry")


def test_constructors_refuse_invalid_messages() -> None:
    for make in (lambda: Ready(0, "w", 1, "cpu"), lambda: Ready(True, "w", 1, "cpu"),
                 lambda: Error("x", 1, "r"), lambda: Done(JOB_ID, 1, [ImageDone("a", SHA)], 1.0),
                 lambda: Dead("")):
        with pytest.raises(ProtocolError):
            make()
    with pytest.raises(ProtocolError):
        encode("HEARTBEAT")
