"""The wire protocol between the encoder and its denoisers: message types, strict encode/decode, socket options.

A message is a multipart ZeroMQ message. Frame 0 is a UTF-8 JSON header (at most 64 KiB)::

    {"proto": "sdxl-split", "v": 1, "type": "JOB", ...fields}

JOB alone carries a second frame: the safetensors bytes of the embedding record. On a ROUTER, zmq
prepends the peer's identity frame; strip it and pass the rest to `decode`.

The flow (credit-based load balancing, Paranoid Pirate heartbeats):

    denoiser -> encoder   READY{credits, ...}   announce capacity (and out_dir, settings_id); once per connection
    encoder  -> denoiser  JOB{work_id, ...}      only against a credit
    denoiser -> encoder   DONE{work_id, images}  returns one credit
    denoiser -> encoder   ERROR{work_id, reason} a per-job failure; also returns one credit
    both ways             HEARTBEAT             every HEARTBEAT_INTERVAL_S; HEARTBEAT_LIVENESS missed = dead
    both ways             DEAD{reason}          the sender hit an unrecoverable failure and is stopping
    both ways             BYE{reason}           orderly shutdown; the sender will send nothing more

Nothing here is ever unpickled: headers are JSON, the payload is safetensors, and every field is
checked for type and range before anything uses it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import zmq

from sdxl_split.shared.embeddings import EmbeddingFormatError, Embeddings, decode_embeddings
from sdxl_split.shared.prompts import MAX_COUNT, PromptEntry
from sdxl_split.shared.wire_fields import (
    ProtocolError,
    entry_field,
    entry_json,
    exact_keys,
    filename_field,
    hex64_field,
    int_field,
    seconds_field,
    str_field,
)

PROTOCOL_ID = "sdxl-split"
PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
# Full-size SDXL fp32 embeddings are about 1.3 MB; 8 MiB leaves room for longer prompts without
# letting a peer make us allocate without bound.
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3
HIGH_WATER_MARK = 1000
LINGER_MS = 1000
MAX_REASON_CHARS = 2000
MAX_WORKER_CHARS = 128
MAX_DEVICE_CHARS = 64
MAX_CREDITS = 64
MAX_IMAGES = MAX_COUNT
MAX_PATH_CHARS = 4096
_ENVELOPE = ("proto", "v", "type")


# ---- the closed set of message types ----


class _Message:
    """A message's JSON header is its dataclass fields (or HEADER_FIELDS), so there is no table to keep in step."""

    TYPE = ""

    @classmethod
    def header_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def _header(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.header_fields()}

    @classmethod
    def _from_header(cls, h: dict[str, Any]) -> Any:
        # The constructor's __post_init__ checks every field's type and range.
        return cls(**{name: h[name] for name in cls.header_fields()})


@dataclass(frozen=True)
class Ready(_Message):
    """A denoiser announces itself and how many jobs it will hold at once."""

    credits: int
    worker: str
    pid: int
    device: str
    # Where its images land, as the denoiser sees it; the encoder's journal records it so a re-run on
    # the same host can check finished images by hash without asking anyone.
    out_dir: str = ""
    # Digest of the settings that decide its pixels (size, steps, model...): with out_dir, tells the
    # encoder whether images a previous run journaled are the ones this denoiser would make.
    settings_id: str = ""

    TYPE = "READY"

    def __post_init__(self) -> None:
        int_field(self.credits, "credits", 1, MAX_CREDITS)
        str_field(self.worker, "worker", 1, MAX_WORKER_CHARS)
        int_field(self.pid, "pid", 0)
        str_field(self.device, "device", 1, MAX_DEVICE_CHARS)
        str_field(self.out_dir, "out_dir", 0, MAX_PATH_CHARS)
        if self.settings_id:
            hex64_field(self.settings_id, "settings_id")


# eq=False: the record holds tensors, whose == is elementwise and has no truth value.
@dataclass(frozen=True, eq=False)
class Job(_Message):
    """One prompt's batch to render, with its embedding record; `payload` is the record's safetensors bytes.
    `work_id` is the encoder's id for the job (shared.jobs.work_id); a denoiser names files by its own."""

    work_id: str
    attempt: int
    entry: PromptEntry
    # Kept out of repr: megabytes of tensors and bytes would bury the job's identity in logs.
    record: Embeddings = field(repr=False)
    payload: bytes = field(repr=False)

    TYPE = "JOB"

    def __post_init__(self) -> None:
        hex64_field(self.work_id, "work_id")
        int_field(self.attempt, "attempt", 1)
        if not isinstance(self.entry, PromptEntry):
            raise ProtocolError("entry must be a PromptEntry")
        entry_field(self.entry, "entry")
        if not isinstance(self.record, Embeddings):
            raise ProtocolError("record must be an Embeddings record")
        hex64_field(self.record.key, "embedding_key")
        if not isinstance(self.payload, bytes):
            raise ProtocolError("payload must be bytes")
        # A job whose prompt texts differ from its embeddings would render one prompt and label it another.
        if self.entry.texts() != self.record.texts:
            raise ProtocolError("entry texts do not match the texts the embeddings were made from")

    @classmethod
    def header_fields(cls) -> tuple[str, ...]:
        # The record travels as the second frame; its key in the header lets the receiver check it.
        return ("work_id", "attempt", "embedding_key", "entry")

    @classmethod
    def build(cls, work_id: str, attempt: int, entry: PromptEntry, record: Embeddings,
              payload: bytes | None = None) -> Job:
        """A JOB from an in-memory record. Pass `payload` when the record's bytes are already at hand
        (e.g. read from the cache) so they are neither re-serialised nor decoded again."""
        return cls(work_id=work_id, attempt=attempt, entry=entry, record=record,
                   payload=record.to_bytes() if payload is None else payload)

    def _header(self) -> dict[str, Any]:
        return {"work_id": self.work_id, "attempt": self.attempt, "embedding_key": self.record.key,
                "entry": entry_json(self.entry)}


@dataclass(frozen=True)
class ImageDone:
    """One finished image: its file name in the output folder and the sha256 of its bytes."""

    file: str
    sha256: str

    def __post_init__(self) -> None:
        filename_field(self.file, "file")
        hex64_field(self.sha256, "sha256")


@dataclass(frozen=True)
class Done(_Message):
    """A job finished; returns one credit."""

    work_id: str
    attempt: int
    images: tuple[ImageDone, ...]
    seconds: float

    TYPE = "DONE"

    def __post_init__(self) -> None:
        hex64_field(self.work_id, "work_id")
        int_field(self.attempt, "attempt", 1)
        if not isinstance(self.images, tuple) or not all(isinstance(i, ImageDone) for i in self.images):
            raise ProtocolError("images must be a tuple of ImageDone")
        if len(self.images) > MAX_IMAGES:
            raise ProtocolError(f"images must hold at most {MAX_IMAGES} entries, got {len(self.images)}")
        if len({i.file for i in self.images}) != len(self.images):
            raise ProtocolError("images name the same file more than once")
        # JSON may carry a whole number of seconds as an int; keep the field a float either way.
        object.__setattr__(self, "seconds", seconds_field(self.seconds, "seconds"))

    def _header(self) -> dict[str, Any]:
        return {**super()._header(), "images": [{"file": i.file, "sha256": i.sha256} for i in self.images]}

    @classmethod
    def _from_header(cls, h: dict[str, Any]) -> Done:
        raw = h["images"]
        if not isinstance(raw, list):
            raise ProtocolError("images must be a list")
        if len(raw) > MAX_IMAGES:
            raise ProtocolError(f"images must hold at most {MAX_IMAGES} entries, got {len(raw)}")
        images = []
        for n, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ProtocolError(f"images[{n}] must be an object")
            exact_keys(item, ("file", "sha256"), f"images[{n}]")
            images.append(ImageDone(file=item["file"], sha256=item["sha256"]))
        return cls(work_id=h["work_id"], attempt=h["attempt"], images=tuple(images), seconds=h["seconds"])


@dataclass(frozen=True)
class Error(_Message):
    """A job failed on this attempt; returns one credit. The encoder decides whether to retry."""

    work_id: str
    attempt: int
    reason: str

    TYPE = "ERROR"

    def __post_init__(self) -> None:
        hex64_field(self.work_id, "work_id")
        int_field(self.attempt, "attempt", 1)
        str_field(self.reason, "reason", 1, MAX_REASON_CHARS)


@dataclass(frozen=True)
class Heartbeat(_Message):
    """I am alive; sent every HEARTBEAT_INTERVAL_S in both directions."""

    TYPE = "HEARTBEAT"


@dataclass(frozen=True)
class Dead(_Message):
    """The sender hit an unrecoverable failure and is stopping; the peer need not wait for heartbeats to lapse."""

    reason: str

    TYPE = "DEAD"

    def __post_init__(self) -> None:
        str_field(self.reason, "reason", 1, MAX_REASON_CHARS)


@dataclass(frozen=True)
class Bye(_Message):
    """Orderly shutdown: the sender will send nothing more."""

    reason: str = ""

    TYPE = "BYE"

    def __post_init__(self) -> None:
        str_field(self.reason, "reason", 0, MAX_REASON_CHARS)


Message = Ready | Job | Done | Error | Heartbeat | Dead | Bye
MESSAGE_TYPES: tuple[type, ...] = (Ready, Job, Done, Error, Heartbeat, Dead, Bye)
_BY_TYPE: dict[str, type] = {cls.TYPE: cls for cls in MESSAGE_TYPES}


def reason_text(text: str) -> str:
    """A free-text reason cut to what the protocol carries (a reason must not be empty)."""
    return text[:MAX_REASON_CHARS] or "unknown"


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
    work_id = hex64_field(header["work_id"], "work_id")
    attempt = int_field(header["attempt"], "attempt", 1)
    key = hex64_field(header["embedding_key"], "embedding_key")
    entry = entry_field(header["entry"], "entry")
    if len(payload) > max_payload_bytes:
        raise ProtocolError(f"JOB payload is {len(payload)} bytes; the limit is {max_payload_bytes}")
    payload = bytes(payload)
    try:
        record = decode_embeddings(payload, expected_key=key)
    except EmbeddingFormatError as err:
        raise ProtocolError(f"JOB payload is not a valid embedding record: {err}") from None
    return Job(work_id=work_id, attempt=attempt, entry=entry, record=record, payload=payload)


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
    if not isinstance(frames, (list, tuple)) or not 1 <= len(frames) <= 2:
        count = len(frames) if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise ProtocolError(f"a message is 1 or 2 frames, got {count}")
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
    if len(frames) != 1:
        raise ProtocolError(f"{kind} must be 1 frame, got {len(frames)}")
    return cls._from_header(header)


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
