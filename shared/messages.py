"""The wire protocol's closed set of messages: typed dataclasses whose fields are checked on construction, so a
message built by us or decoded from a peer is valid or never exists. See protocol.py for the flow and codec."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.image_settings import MAX_STEPS, JobOptions, JobSettings
from sdxl_split.shared.loras import LoraUse, plain_name_problem
from sdxl_split.shared.prompts import MAX_COUNT, MAX_LORAS, PromptEntry
from sdxl_split.shared.wire_fields import (
    MAX_FILENAME_CHARS,
    MAX_PATH_CHARS,
    ProtocolError,
    entry_field,
    entry_json,
    exact_keys,
    filename_field,
    hex64_field,
    int_field,
    scale_field,
    seconds_field,
    short_hex_field,
    str_field,
)

MAX_REASON_CHARS = 2000
MAX_WORKER_CHARS = 128
MAX_DEVICE_CHARS = 64
MAX_CREDITS = 64
MAX_IMAGES = MAX_COUNT
# A preview is a small PNG (at most 256 px a side).
MAX_PREVIEW_BYTES = 2 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    `job_id` is the encoder's id for the job (shared.jobs.job_id); a denoiser names files by its own."""

    job_id: str
    attempt: int
    entry: PromptEntry
    # Kept out of repr: megabytes of tensors and bytes would bury the job's identity in logs.
    record: Embeddings = field(repr=False)
    payload: bytes = field(repr=False)
    # The UNet halves of the job's LoRAs: the denoiser renders it with exactly these files, or answers ERROR.
    loras: tuple[LoraUse, ...] = ()
    # Its own image settings, previews, images sent back (an HTTP request's); by default the denoiser's own.
    options: JobOptions = JobOptions()

    TYPE = "JOB"

    def __post_init__(self) -> None:
        hex64_field(self.job_id, "job_id")
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
        if not isinstance(self.loras, tuple) or len(self.loras) > MAX_LORAS:
            raise ProtocolError(f"loras must be a tuple of at most {MAX_LORAS}")
        for n, use in enumerate(self.loras):
            if not isinstance(use, LoraUse):
                raise ProtocolError("loras must hold LoraUse records")
            str_field(use.name, f"loras[{n}].name", 1, MAX_FILENAME_CHARS)
            if problem := plain_name_problem(use.name):
                raise ProtocolError(problem)
            hex64_field(use.sha256, f"loras[{n}].sha256")
            scale_field(use.scale, f"loras[{n}]")
            short_hex_field(use.a1111_hash, f"loras[{n}].a1111_hash")
        if not isinstance(self.options, JobOptions) or not isinstance(self.options.settings, JobSettings):
            raise ProtocolError("options must be JobOptions")
        if problem := self.options.problem():
            raise ProtocolError(f"options: {problem}")

    @classmethod
    def header_fields(cls) -> tuple[str, ...]:
        # The record travels as the second frame; its key in the header lets the receiver check it.
        return ("job_id", "attempt", "embedding_key", "entry", "loras", "options")

    @classmethod
    def build(cls, job_id: str, attempt: int, entry: PromptEntry, record: Embeddings, payload: bytes | None = None,
              loras: tuple[LoraUse, ...] = (), options: JobOptions = JobOptions()) -> Job:
        """A JOB from an in-memory record. Pass `payload` when the record's bytes are already at hand
        (e.g. read from the cache) so they are neither re-serialised nor decoded again."""
        return cls(job_id=job_id, attempt=attempt, entry=entry, record=record,
                   payload=record.to_bytes() if payload is None else payload, loras=tuple(loras), options=options)

    def _header(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "attempt": self.attempt, "embedding_key": self.record.key,
                "entry": entry_json(self.entry),
                "loras": [{"name": u.name, "sha256": u.sha256, "scale": u.scale, "a1111_hash": u.a1111_hash}
                          for u in self.loras],
                "options": self.options.as_dict()}


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

    job_id: str
    attempt: int
    images: tuple[ImageDone, ...]
    seconds: float
    # The PNGs themselves, one frame each after the header, when the job asked for them (JobOptions.return_images).
    image_bytes: tuple[bytes, ...] = field(default=(), repr=False)

    TYPE = "DONE"

    def __post_init__(self) -> None:
        hex64_field(self.job_id, "job_id")
        int_field(self.attempt, "attempt", 1)
        if not isinstance(self.images, tuple) or not all(isinstance(i, ImageDone) for i in self.images):
            raise ProtocolError("images must be a tuple of ImageDone")
        if len(self.images) > MAX_IMAGES:
            raise ProtocolError(f"images must hold at most {MAX_IMAGES} entries, got {len(self.images)}")
        if len({i.file for i in self.images}) != len(self.images):
            raise ProtocolError("images name the same file more than once")
        # JSON may carry a whole number of seconds as an int; keep the field a float either way.
        object.__setattr__(self, "seconds", seconds_field(self.seconds, "seconds"))
        if self.image_bytes:
            if len(self.image_bytes) != len(self.images):
                raise ProtocolError(f"DONE carries {len(self.image_bytes)} image frames for {len(self.images)} images")
            for image, data in zip(self.images, self.image_bytes):
                # The bytes are the file the sha256 names, or they are not passed on.
                if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != image.sha256:
                    raise ProtocolError(f"the bytes sent for {image.file} do not have the sha256 it names")

    @classmethod
    def header_fields(cls) -> tuple[str, ...]:
        return ("job_id", "attempt", "images", "seconds")

    def _header(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "attempt": self.attempt, "seconds": self.seconds,
                "images": [{"file": i.file, "sha256": i.sha256} for i in self.images]}

    @classmethod
    def _from_header(cls, h: dict[str, Any], image_bytes: tuple[bytes, ...] = ()) -> Done:
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
        return cls(job_id=h["job_id"], attempt=h["attempt"], images=tuple(images), seconds=h["seconds"],
                   image_bytes=image_bytes)


ERROR_SCOPES = ("job", "denoiser")


@dataclass(frozen=True)
class Error(_Message):
    """A job failed on this attempt; returns one credit. The encoder decides whether to retry. `scope` says
    whose fault it was: "job" (its content cannot be rendered: counts towards dead-lettering) or "denoiser"
    (this denoiser cannot render it now: a full disk, a LoRA it lacks; the job goes to another one)."""

    job_id: str
    attempt: int
    reason: str
    scope: str = "job"

    TYPE = "ERROR"

    def __post_init__(self) -> None:
        hex64_field(self.job_id, "job_id")
        int_field(self.attempt, "attempt", 1)
        str_field(self.reason, "reason", 1, MAX_REASON_CHARS)
        if self.scope not in ERROR_SCOPES:
            raise ProtocolError(f"scope must be one of {ERROR_SCOPES}, got {str(self.scope)[:20]!r}")


@dataclass(frozen=True)
class Progress(_Message):
    """A job's denoising reached `step` of `steps`; `preview` (its own frame) is a small PNG of the image so far,
    when the job asked for previews and this step is one of theirs."""

    job_id: str
    attempt: int
    step: int
    steps: int
    preview: bytes = field(default=b"", repr=False)

    TYPE = "PROGRESS"

    def __post_init__(self) -> None:
        hex64_field(self.job_id, "job_id")
        int_field(self.attempt, "attempt", 1)
        int_field(self.steps, "steps", 1, MAX_STEPS)
        int_field(self.step, "step", 0, self.steps)
        if not isinstance(self.preview, bytes) or len(self.preview) > MAX_PREVIEW_BYTES:
            raise ProtocolError(f"preview must be at most {MAX_PREVIEW_BYTES} bytes")
        if self.preview and not self.preview.startswith(PNG_SIGNATURE):
            raise ProtocolError("preview must be a PNG")

    @classmethod
    def header_fields(cls) -> tuple[str, ...]:
        return ("job_id", "attempt", "step", "steps")


@dataclass(frozen=True)
class Cancel(_Message):
    """Stop this job at its next step and free the GPU: nobody wants its images any more (the HTTP client left,
    or interrupted it). The denoiser answers ERROR, which returns the credit."""

    job_id: str
    attempt: int
    reason: str = "cancelled"

    TYPE = "CANCEL"

    def __post_init__(self) -> None:
        hex64_field(self.job_id, "job_id")
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


Message = Ready | Job | Done | Error | Progress | Cancel | Heartbeat | Dead | Bye
MESSAGE_TYPES: tuple[type, ...] = (Ready, Job, Done, Error, Progress, Cancel, Heartbeat, Dead, Bye)


def reason_text(text: str) -> str:
    """A free-text reason cut to what the protocol carries (a reason must not be empty)."""
    return text[:MAX_REASON_CHARS] or "unknown"
