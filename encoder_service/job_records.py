"""What the job table knows of each job and each denoiser: plain records, changed only by the table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sdxl_split.shared.image_settings import JobOptions
from sdxl_split.shared.loras import LoraUse
from sdxl_split.shared.prompts import PromptEntry


class JobState(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    DONE = "done"
    DEAD = "dead"
    # Nobody wants its images any more (an HTTP client left or interrupted it).
    CANCELLED = "cancelled"


@dataclass
class JobRecord:
    """Only the key is held: the record and its bytes are read from the cache when sent, so the encoder's
    memory stays flat however many prompts are queued."""

    job_id: str
    entry: PromptEntry
    embedding_key: str
    loras: tuple[LoraUse, ...] = ()  # the UNet halves, sent with it
    options: JobOptions = JobOptions()  # its own image settings, previews, images sent back
    attempt: int = 0  # sends so far; a DONE/ERROR must name the current one
    failures: int = 0  # ERRORs its own content caused
    # Denoisers (by key) that died, left or hung holding it: a job that takes down one denoiser after another is
    # buried.
    lost_on: set[str] = field(default_factory=set)
    held_by: bytes | None = None  # the identity of the denoiser it was sent to, while dispatched
    failed_on: set[bytes] = field(default_factory=set)
    # Denoisers (by key) that said they cannot render it (a LoRA they lack, a full disk), and why: it never goes
    # back to them.
    refused_by: dict[str, str] = field(default_factory=dict)
    state: JobState = JobState.QUEUED


@dataclass
class DenoiserRecord:
    identity: bytes
    # What it calls itself (host[pid]@device): shown to the user, never trusted.
    name: str
    credits: int
    last_seen: float
    # What strikes and quarantine hold against it: its CURVE key where CURVE is on, which it cannot forge; else
    # its connection's routing identity, which a hostile peer can change by reconnecting (so without CURVE the
    # job-side rules, not quarantine, keep such a peer from burying jobs).
    key: str = ""
    out_dir: str = ""
    settings_id: str = ""
    inflight: set[str] = field(default_factory=set)
    # When it last finished something, or took its first job while idle: a render that hangs stops this clock.
    last_progress: float = 0.0
    # Seconds of its slowest finished job: the default deadline scales with it.
    slowest_job_s: float = 0.0
    finished_jobs: int = 0
    # Distinct jobs it failed before finishing any: a denoiser that fails everything is broken, not the jobs.
    failed_jobs: set[str] = field(default_factory=set)
