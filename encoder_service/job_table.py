"""The dispatch core, with no sockets: which jobs exist, which denoiser holds what, and what each report means.

The socket loop (dispatcher.py) feeds it what peers say and sends what it picks, as zguide's Paranoid Pirate
queue keeps its worker list apart from its poll loop. Every rule about credits, late reports, retries and
dead-lettering lives here, and tests/unit drives it directly.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from sdxl_split.shared.prompts import PromptEntry

# (event, work id, fields) -> the journal; (message) -> the user.
Log = Callable[..., None]
Report = Callable[[str], None]
# (work id, output folder, render settings id) -> images a previous run finished there.
Finished = dict[tuple[str, str, str], list[dict]]


class JobState(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    DONE = "done"
    DEAD = "dead"


@dataclass
class Job:
    """Only the key is held: the record and its bytes are read from the cache when sent, so the encoder's
    memory stays flat however many prompts are queued."""

    work_id: str
    entry: PromptEntry
    embedding_key: str
    attempt: int = 0  # sends so far; a DONE/ERROR must name the current one
    failures: int = 0  # ERRORs
    losses: int = 0  # times its denoiser died or left holding it
    worker: bytes | None = None
    failed_on: set[bytes] = field(default_factory=set)
    state: JobState = JobState.QUEUED


@dataclass
class Worker:
    identity: bytes
    name: str
    credits: int
    last_seen: float
    out_dir: str = ""
    settings_id: str = ""
    inflight: set[str] = field(default_factory=set)


class JobTable:
    def __init__(self, max_attempts: int, log: Log, report: Report, finished: Finished | None = None) -> None:
        self.max_attempts = max_attempts
        self.log = log
        self.report = report
        # Images a previous run finished, by (job, output folder, render settings): not rendered again.
        self.finished = finished or {}
        self.jobs: dict[str, Job] = {}
        self.queue: list[str] = []
        self.workers: dict[bytes, Worker] = {}
        self.already_done = 0
        self.ever_attached = False
        # Stopping: hand out nothing new, wait for what is out.
        self.draining = False

    # ---- jobs ----
    def add(self, work_id: str, entry: PromptEntry, embedding_key: str) -> bool:
        if work_id in self.jobs:
            return False
        self.jobs[work_id] = Job(work_id, entry, embedding_key)
        self.queue.append(work_id)
        self.log("queued", work_id, line=entry.line, prompt=entry.prompt[:200])
        return True

    @property
    def outstanding(self) -> int:
        return sum(job.state in (JobState.QUEUED, JobState.DISPATCHED) for job in self.jobs.values())

    @property
    def in_flight(self) -> int:
        return sum(job.state is JobState.DISPATCHED for job in self.jobs.values())

    def counts(self) -> dict[str, int]:
        """Jobs by state; `done` counts only what was rendered in this run."""
        out = {state.value: 0 for state in JobState}
        for job in self.jobs.values():
            out[job.state.value] += 1
        out["done"] -= self.already_done
        return out

    # ---- workers ----
    def attach(self, identity: bytes, name: str, credits: int, now: float, out_dir: str = "",
               settings_id: str = "") -> Worker:
        """READY: a new denoiser, or one that restarted (whatever it held goes back to the queue)."""
        if identity in self.workers:
            self.lose(identity, f"denoiser {self.workers[identity].name} restarted", quiet=True)
        worker = Worker(identity, name, credits, now, out_dir, settings_id)
        self.workers[identity] = worker
        self.ever_attached = True
        return worker

    def heard(self, identity: bytes, now: float) -> Worker | None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = now
        return worker

    def silent(self, now: float, timeout_s: float) -> list[Worker]:
        """Workers not heard from within timeout_s."""
        return [w for w in self.workers.values() if now - w.last_seen > timeout_s]

    def lose(self, identity: bytes, why: str, quiet: bool = False) -> None:
        """A denoiser died, left or stopped answering: its jobs go back to the queue."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return
        if not quiet or worker.inflight:
            self.report(why + (f"; re-queueing {len(worker.inflight)} job(s)" if worker.inflight else ""))
        for work_id in sorted(worker.inflight):
            job = self.jobs[work_id]
            if job.state is JobState.DISPATCHED and job.worker == identity:
                job.losses += 1
                self._retry_or_bury(job, why)

    # ---- dispatch ----
    def pick(self, blocked: set[bytes] = frozenset()) -> tuple[Job, Worker] | None:  # type: ignore[assignment]
        """The next job to send and the denoiser to send it to, in queue order; None when nothing can go now.
        A job whose images a previous run left intact in that denoiser's folder is marked done instead."""
        if self.draining:
            return None
        for work_id in list(self.queue):
            ready = [w for w in self.workers.values() if w.credits > 0 and w.identity not in blocked]
            if not ready:
                return None
            job = self.jobs[work_id]
            worker = self._choose(job, ready)
            if worker is None:
                continue
            images = self.finished.get((job.work_id, worker.out_dir, worker.settings_id))
            if images is not None:
                self.queue.remove(work_id)
                job.state = JobState.DONE
                self.already_done += 1
                self.log("done", job.work_id, out_dir=worker.out_dir, settings=worker.settings_id, images=images,
                         reused=True)
                continue
            return job, worker
        return None

    def _choose(self, job: Job, ready: list[Worker]) -> Worker | None:
        """The freest worker that has not failed this job; one that has, only if no other is alive."""
        fresh = [w for w in ready if w.identity not in job.failed_on]
        if not fresh and any(w.identity not in job.failed_on for w in self.workers.values()):
            return None  # wait for a denoiser that has not failed it yet
        pool = fresh or ready
        return max(pool, key=lambda w: (w.credits, -len(w.inflight))) if pool else None

    def sent(self, job: Job, worker: Worker) -> None:
        self.queue.remove(job.work_id)
        job.attempt += 1
        job.state, job.worker = JobState.DISPATCHED, worker.identity
        worker.credits -= 1
        worker.inflight.add(job.work_id)
        self.log("dispatched", job.work_id, attempt=job.attempt, worker=worker.name)

    def unsendable(self, job: Job, reason: str) -> None:
        """Its embeddings cannot be read any more: nobody could render it."""
        self.queue.remove(job.work_id)
        self._bury(job, f"embeddings unavailable: {reason}")

    # ---- reports ----
    def _owned(self, worker: Worker, work_id: str, attempt: int) -> Job | None:
        """The job if this report is about its current attempt on this worker. A late report, about an attempt
        that was re-queued elsewhere, only returns the credit."""
        if work_id in worker.inflight:
            worker.inflight.discard(work_id)
            worker.credits += 1
        job = self.jobs.get(work_id)
        if (job is None or job.state is not JobState.DISPATCHED or job.attempt != attempt
                or job.worker != worker.identity):
            return None
        return job

    def finish(self, identity: bytes, work_id: str, attempt: int, images: list[dict], seconds: float) -> bool:
        """DONE; False when it was late or not this worker's to report."""
        worker = self.workers.get(identity)
        job = self._owned(worker, work_id, attempt) if worker else None
        if job is None:
            return False
        job.state, job.worker = JobState.DONE, None
        self.log("done", job.work_id, attempt=attempt, worker=worker.name, seconds=seconds, out_dir=worker.out_dir,
                 settings=worker.settings_id, images=images)
        return True

    def fail(self, identity: bytes, work_id: str, attempt: int, reason: str) -> bool:
        """ERROR: the job is retried on another denoiser, or dead-lettered after max_attempts."""
        worker = self.workers.get(identity)
        job = self._owned(worker, work_id, attempt) if worker else None
        if job is None:
            return False
        job.failures += 1
        job.failed_on.add(identity)
        self.log("failed", job.work_id, attempt=attempt, worker=worker.name, reason=reason)
        self._retry_or_bury(job, reason)
        return True

    def _retry_or_bury(self, job: Job, reason: str) -> None:
        job.worker = None
        # A job that keeps killing its denoisers (say, OOM) is given up too, with more leeway, since a
        # denoiser can also die or leave for reasons of its own.
        if job.failures >= self.max_attempts or job.losses >= 2 * self.max_attempts:
            self._bury(job, reason)
        else:
            job.state = JobState.QUEUED
            self.queue.insert(0, job.work_id)
            self.log("requeued", job.work_id, attempt=job.attempt, reason=reason)

    def _bury(self, job: Job, reason: str) -> None:
        job.state, job.worker = JobState.DEAD, None
        self.log("dead_letter", job.work_id, attempts=job.attempt, reason=reason)
        self.report(f"gave up on line {job.entry.line} ({job.entry.prompt[:50]!r}) after {job.attempt} "
                    f"attempt(s): {reason}")

    def leftovers(self) -> list[Job]:
        """Jobs neither done nor dead-lettered: queued, or out on a denoiser."""
        return [job for job in self.jobs.values() if job.state in (JobState.QUEUED, JobState.DISPATCHED)]
