"""The wire protocol between the encoder and its denoisers: message types, strict encode/decode, socket options.

A message is a multipart ZeroMQ message. Frame 0 is a UTF-8 JSON header (at most 64 KiB)::

    {"proto": "sdxl-split", "v": 3, "type": "JOB", ...fields}

JOB carries a second frame: the safetensors bytes of the embedding record. DONE carries one PNG per image after
its header when the job asked for its images back; PROGRESS carries a preview PNG when there is one. On a ROUTER, zmq
prepends the peer's identity frame; strip it and pass the rest to `decode`.

The flow (credit-based load balancing, Paranoid Pirate heartbeats):

    denoiser -> encoder   READY{credits, ...}   announce capacity (and out_dir, settings_id); once per connection
    encoder  -> denoiser  JOB{job_id, ...}      only against a credit
    denoiser -> encoder   DONE{job_id, images}  returns one credit
    denoiser -> encoder   ERROR{job_id, reason} a per-job failure; also returns one credit
    denoiser -> encoder   PROGRESS{job_id, step} a step done, with a small preview when the job asked for one
    encoder  -> denoiser  CANCEL{job_id}        stop that job at its next step; it is answered by an ERROR
    both ways             HEARTBEAT             every HEARTBEAT_INTERVAL_S; HEARTBEAT_LIVENESS missed = dead
    both ways             DEAD{reason}          the sender hit an unrecoverable failure and is stopping
    both ways             BYE{reason}           orderly shutdown; the sender will send nothing more

Nothing here is ever unpickled: headers are JSON, the payload is safetensors, and every field is
checked for type and range before anything uses it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import zmq

from sdxl_split.shared.embeddings import EmbeddingFormatError, decode_embeddings
from sdxl_split.shared.image_settings import JobOptions, JobSettings
from sdxl_split.shared.liveness import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS  # noqa: F401
from sdxl_split.shared.loras import LoraUse
from sdxl_split.shared.messages import (  # noqa: F401  (the message set is part of this module's interface)
    MAX_CREDITS,
    MAX_DEVICE_CHARS,
    MAX_IMAGES,
    MAX_PATH_CHARS,
    MAX_REASON_CHARS,
    MAX_WORKER_CHARS,
    MESSAGE_TYPES,
    Bye,
    Cancel,
    Dead,
    Done,
    Error,
    Heartbeat,
    ImageDone,
    Job,
    Message,
    Progress,
    Ready,
    reason_text,
)
from sdxl_split.shared.prompts import MAX_LORAS
from sdxl_split.shared.wire_fields import ProtocolError, entry_field, exact_keys, hex64_field, int_field

PROTOCOL_ID = "sdxl-split"
# 2: ERROR carries a scope. 3: JOB, DONE and ERROR name the job by `job_id` (was `work_id`); JOB carries options
# (its own image settings, previews, images sent back); PROGRESS and CANCEL; DONE may carry the PNGs.
PROTOCOL_VERSION = 3
MAX_HEADER_BYTES = 64 * 1024
# Full-size SDXL fp32 embeddings are about 1.3 MB a chunk of 77 tokens; 16 MiB holds the longest compiled prompt
# (8 chunks, about 10.1 MB) without letting a peer make us allocate without bound.
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
HIGH_WATER_MARK = 1000
LINGER_MS = 1000
_ENVELOPE = ("proto", "v", "type")


_BY_TYPE: dict[str, type] = {cls.TYPE: cls for cls in MESSAGE_TYPES}


# ---- encode / decode ----


def encode(msg: Message, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD) -> list[bytes]:
    """The frames to send (after the identity frame, on a ROUTER). Refuses what the peer would refuse."""
    if not isinstance(msg, MESSAGE_TYPES):
        raise ProtocolError(f"cannot encode {type(msg).__name__}; not a protocol message")
    header = {"proto": PROTOCOL_ID, "v": PROTOCOL_VERSION, "type": msg.TYPE, **msg._header()}
    data = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.TYPE} header is {len(data)} bytes; the limit is {MAX_HEADER_BYTES}")
    if isinstance(msg, Job):
        # Sending more than the peer's MAXMSGSIZE would not fail here: the peer would drop the connection.
        if len(msg.payload) > max_payload_bytes:
            raise ProtocolError(f"JOB payload is {len(msg.payload)} bytes; the limit is {max_payload_bytes}")
        return [data, msg.payload]
    if isinstance(msg, Done) and msg.image_bytes:
        if any(len(image) > max_payload_bytes for image in msg.image_bytes):
            raise ProtocolError(f"a DONE image is over {max_payload_bytes} bytes")
        return [data, *msg.image_bytes]
    if isinstance(msg, Progress) and msg.preview:
        return [data, msg.preview]
    return [data]


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"header holds {name}, which is not JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    # Duplicate keys would let two readers of one header see different values.
    if len(obj) != len(pairs):
        raise ProtocolError("header repeats a key")
    return obj


def _parse_header(frame: bytes) -> dict[str, Any]:
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(frame)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        text = bytes(frame).decode("utf-8")
        header = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except ProtocolError:
        raise
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad JSON and over-long integer literals; RecursionError, deep nesting.
        raise ProtocolError("header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    return header


def _decode_job(header: dict[str, Any], payload: bytes, max_payload_bytes: int) -> Job:
    job_id = hex64_field(header["job_id"], "job_id")
    attempt = int_field(header["attempt"], "attempt", 1)
    key = hex64_field(header["embedding_key"], "embedding_key")
    entry = entry_field(header["entry"], "entry")
    loras = lora_uses(header["loras"])
    options = job_options(header["options"])
    if len(payload) > max_payload_bytes:
        raise ProtocolError(f"JOB payload is {len(payload)} bytes; the limit is {max_payload_bytes}")
    payload = bytes(payload)
    try:
        record = decode_embeddings(payload, expected_key=key)
    except EmbeddingFormatError as err:
        raise ProtocolError(f"JOB payload is not a valid embedding record: {err}") from None
    return Job(job_id=job_id, attempt=attempt, entry=entry, record=record, payload=payload, loras=loras,
               options=options)


def job_options(value: Any) -> JobOptions:
    """A JOB's `options` object: its keys exactly, each value typed and ranged by JobOptions itself."""
    if not isinstance(value, dict):
        raise ProtocolError("options must be an object")
    exact_keys(value, ("settings", "preview_every", "return_images"), "options")
    settings = value["settings"]
    if not isinstance(settings, dict):
        raise ProtocolError("options.settings must be an object")
    exact_keys(settings, tuple(JobSettings().as_dict()), "options.settings")
    guidance = settings["guidance"]
    if isinstance(guidance, int) and not isinstance(guidance, bool):
        settings = {**settings, "guidance": float(guidance)}  # JSON may carry 5.0 as 5
    options = JobOptions(settings=JobSettings(**settings), preview_every=value["preview_every"],
                         return_images=value["return_images"])
    if problem := options.problem():
        raise ProtocolError(f"options: {problem}")
    return options


def lora_uses(value: Any) -> tuple[LoraUse, ...]:
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        raise ProtocolError(f"loras must be a list of at most {MAX_LORAS}")
    uses = []
    for n, item in enumerate(value):
        if not isinstance(item, dict):
            raise ProtocolError(f"loras[{n}] must be an object")
        exact_keys(item, ("name", "sha256", "scale", "a1111_hash"), f"loras[{n}]")
        uses.append(LoraUse(name=item["name"], sha256=item["sha256"], scale=item["scale"],
                            a1111_hash=item["a1111_hash"]))
    return tuple(uses)  # Job's own checks validate every field


def decode(frames: Sequence[bytes], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD) -> Message:
    """Parse and fully validate one message (the frames after any identity frame); raises only ProtocolError."""
    try:
        return _decode(frames, max_payload_bytes)
    except ProtocolError:
        raise
    except (ValueError, TypeError) as err:
        # The field checks are meant to catch everything first; this keeps the one-exception promise
        # should a constructor downstream (e.g. PromptEntry) grow checks of its own.
        raise ProtocolError(f"invalid message: {err}") from None


def _decode(frames: Sequence[bytes], max_payload_bytes: int) -> Message:
    if not isinstance(frames, (list, tuple)) or not 1 <= len(frames) <= 1 + MAX_IMAGES:
        count = len(frames) if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise ProtocolError(f"a message is 1 to {1 + MAX_IMAGES} frames, got {count}")
    if not all(isinstance(f, (bytes, bytearray, memoryview)) for f in frames):
        raise ProtocolError("frames must be bytes")
    header = _parse_header(frames[0])
    proto = header.get("proto")
    if proto != PROTOCOL_ID:
        raise ProtocolError(f"not an {PROTOCOL_ID} message (proto {str(proto)[:40]!r})")
    version = header.get("v")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {str(version)[:20]!r} received; this build speaks "
                            f"version {PROTOCOL_VERSION}; run the same sdxl-split version on both sides")
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in _BY_TYPE:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    cls = _BY_TYPE[kind]
    exact_keys(header, _ENVELOPE + cls.header_fields(), f"{kind} header")
    if kind == "JOB":
        if len(frames) != 2:
            raise ProtocolError(f"JOB must be 2 frames (header, payload), got {len(frames)}")
        return _decode_job(header, frames[1], max_payload_bytes)
    extra = tuple(bytes(frame) for frame in frames[1:])
    if kind == "DONE":  # the header, then the PNGs when the job asked for them
        return Done._from_header(header, image_bytes=extra)
    if kind == "PROGRESS" and len(extra) <= 1:  # the header, then a preview at some steps
        return Progress(**{name: header[name] for name in Progress.header_fields()}, preview=extra[0] if extra else b"")
    if extra:
        raise ProtocolError(f"{kind} must be 1 frame, got {len(frames)}")
    return cls._from_header(header)


def job_identity(frames: Sequence[bytes]) -> tuple[str, int] | None:
    """(job_id, attempt) of a JOB whose header is sound though the message as a whole was refused (a payload
    that breaks the schema, say), so the receiver can answer ERROR instead of leaving the job hanging."""
    try:
        header = _parse_header(frames[0])
        if header.get("proto") != PROTOCOL_ID or header.get("v") != PROTOCOL_VERSION or header.get("type") != "JOB":
            return None
        return hex64_field(header.get("job_id"), "job_id"), int_field(header.get("attempt"), "attempt", 1)
    except (ProtocolError, IndexError, TypeError):
        return None


# ---- socket options: the one place they are set ----


def _configure_common(sock: zmq.Socket, max_payload_bytes: int) -> None:
    # Per-frame bound: the payload frame is the largest; the header is capped separately.
    sock.setsockopt(zmq.MAXMSGSIZE, max_payload_bytes + MAX_HEADER_BYTES)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.LINGER, LINGER_MS)


def configure_router(sock: zmq.Socket, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD) -> None:
    """Options for the encoder's ROUTER; call before bind. ROUTER_MANDATORY turns a send to a vanished
    peer into an error (zmq.EHOSTUNREACH) instead of a silent drop, so its job can be re-queued."""
    _configure_common(sock, max_payload_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


def configure_dealer(sock: zmq.Socket, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD) -> None:
    """Options for a denoiser's DEALER; call before connect. IMMEDIATE keeps messages from queueing on a
    connection that is not up yet, where they would be lost if it never comes up."""
    _configure_common(sock, max_payload_bytes)
    sock.setsockopt(zmq.IMMEDIATE, 1)
