"""The dispatch core, with no sockets: which jobs exist, which denoiser holds what, and what each report means.

The socket loop (dispatcher.py) feeds it what peers say and sends what it picks, as zguide's Paranoid Pirate
queue keeps its denoiser list apart from its poll loop. Every rule about credits, late reports, retries and
dead-lettering lives here, and tests/unit drives it directly.
"""

from __future__ import annotations

from collections.abc import Callable

from sdxl_split.encoder_service.deadlines import overdue
from sdxl_split.encoder_service.job_records import DenoiserRecord, JobRecord, JobState
from sdxl_split.shared.image_settings import JobOptions
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.text import plural

# (event, job id, fields) -> the journal; (message) -> the user.
Log = Callable[..., None]
Report = Callable[[str], None]
# (job id, output folder, render settings id) -> images a previous run finished there.
Finished = dict[tuple[str, str, str], list[dict]]


# A denoiser that loses this many jobs (dies, leaves or hangs holding them) is quarantined: a flapping or hostile
# peer must not sink good jobs, so the count is held against the denoiser, by its key, not the name it gives.
QUARANTINE_STRIKES = 3


def connection_key(identity: bytes) -> str:
    """A peer's key without CURVE: its connection's routing identity (a new connection is a new peer)."""
    return "connection:" + identity.hex()


class JobTable:
    def __init__(self, max_attempts: int, log: Log, report: Report, finished: Finished | None = None,
                 job_timeout_s: float | None = None,
                 tell: Callable[[bytes, str], None] = lambda identity, why: None) -> None:
        self.max_attempts = max_attempts
        self.job_timeout_s = job_timeout_s
        # Says goodbye to a denoiser dropped for cause, so it does not wait on in silence.
        self.tell = tell
        # Strikes per denoiser key (DenoiserRecord.key), and the keys refused from now on.
        self.strikes: dict[str, int] = {}
        self.quarantined: set[str] = set()
        self.quarantined_identities: set[bytes] = set()
        self.log = log
        self.report = report
        # Images a previous run finished, by (job, output folder, render settings): not rendered again.
        self.finished = finished or {}
        self.jobs: dict[str, JobRecord] = {}
        self.queue: list[str] = []
        self.denoisers: dict[bytes, DenoiserRecord] = {}
        # Peers heartbeating before their READY (loading a model), by when last heard: a failed job waits for
        # one of them rather than going back to the denoiser that failed it.
        self.coming: dict[bytes, float] = {}
        self.already_done = 0
        self.ever_attached = False
        # Stopping: hand out nothing new, wait for what is out.
        self.draining = False

    # ---- jobs ----
    def add(self, job_id: str, entry: PromptEntry, embedding_key: str, loras: tuple = (),
            options: JobOptions = JobOptions()) -> bool:
        if job_id in self.jobs:
            return False
        self.jobs[job_id] = JobRecord(job_id, entry, embedding_key, loras, options)
        self.queue.append(job_id)
        self.log("queued", job_id, line=entry.line, prompt=entry.prompt[:200])
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

    # ---- denoisers ----
    def attach(self, identity: bytes, name: str, credits: int, now: float, out_dir: str = "",
               settings_id: str = "", key: str | None = None) -> DenoiserRecord | None:
        """READY: a new denoiser, or one that restarted (whatever it held goes back to the queue). None for a
        quarantined one, which gets nothing. `key`: its CURVE key, where CURVE is on."""
        if identity in self.denoisers:
            self.lose(identity, f"denoiser {self.denoisers[identity].name} restarted", quiet=True)
        key = key or connection_key(identity)
        if key in self.quarantined:
            self.quarantined_identities.add(identity)
            return None
        self.coming.pop(identity, None)
        denoiser = DenoiserRecord(identity, name, credits, now, key, out_dir, settings_id, last_progress=now)
        self.denoisers[identity] = denoiser
        self.ever_attached = True
        return denoiser

    def heard(self, identity: bytes, now: float) -> DenoiserRecord | None:
        """A message from a peer: its denoiser record, or None for one that has not said READY (yet)."""
        denoiser = self.denoisers.get(identity)
        if denoiser is not None:
            denoiser.last_seen = now
        elif identity not in self.quarantined_identities:
            self.coming[identity] = now
        return denoiser

    def silent(self, now: float, timeout_s: float) -> list[DenoiserRecord]:
        """Denoisers not heard from within timeout_s (peers still loading are forgotten the same way)."""
        self.coming = {identity: seen for identity, seen in self.coming.items() if now - seen <= timeout_s}
        return [w for w in self.denoisers.values() if now - w.last_seen > timeout_s]

    def lose(self, identity: bytes, why: str, quiet: bool = False, orderly: bool = False) -> None:
        """A denoiser died, left, hung or stopped answering: its jobs go back to the queue, and each counts as a
        strike against it (unless it left in order, with a BYE). The loss counts against a job too, unless the
        peer never finished a job while others are attached: a peer that takes jobs and vanishes, under a new
        name each time, must not bury good jobs a healthy denoiser would render."""
        denoiser = self.denoisers.pop(identity, None)
        if denoiser is None:
            return
        # A denoiser leaving in order while the run stops hands back the jobs it had not started: nothing to tell.
        if (not quiet or denoiser.inflight) and not (orderly and self.draining):
            self.report(why + (f"; re-queueing {plural(len(denoiser.inflight), 'job')}" if denoiser.inflight else ""))
        blame_jobs = not orderly and (denoiser.finished_jobs > 0 or not self.denoisers)
        lost = 0
        for job_id in sorted(denoiser.inflight):
            job = self.jobs.get(job_id)  # None: cancelled and forgotten while this denoiser still held it
            if job is not None and job.state is JobState.DISPATCHED and job.held_by == identity:
                lost += 1
                if blame_jobs:
                    job.lost_on.add(denoiser.key)
                self._retry_or_bury(job, why)
        if not orderly:
            self._strike(denoiser, lost)

    def _strike(self, denoiser: DenoiserRecord, count: int) -> None:
        if count <= 0 or denoiser.key in self.quarantined:
            return
        self.strikes[denoiser.key] = self.strikes.get(denoiser.key, 0) + count
        if self.strikes[denoiser.key] >= QUARANTINE_STRIKES:
            self._quarantine(denoiser, f"it lost {self.strikes[denoiser.key]} jobs")

    def _quarantine(self, denoiser: DenoiserRecord, why: str) -> None:
        self.quarantined.add(denoiser.key)
        self.quarantined_identities.add(denoiser.identity)
        self.report(f"quarantined denoiser {denoiser.name}: {why}; it gets no more work in this run")
        for identity, other in list(self.denoisers.items()):
            if other.key == denoiser.key:
                self.quarantined_identities.add(identity)
                self.lose(identity, f"denoiser {other.name} quarantined", quiet=True, orderly=True)
                self.tell(identity, f"denoiser {other.name} is quarantined for this run: {why}")

    def overdue(self, now: float) -> list[tuple[DenoiserRecord, float]]:
        """Denoisers holding jobs that have made no progress within their deadline, with that deadline."""
        return overdue(self.denoisers.values(), now, self.job_timeout_s)

    # ---- dispatch ----
    def pick(self, blocked: set[bytes] = frozenset()) -> tuple[JobRecord, DenoiserRecord] | None:  # type: ignore[assignment]
        """The next job to send and the denoiser to send it to, in queue order; None when nothing can go now.
        A job whose images a previous run left intact in that denoiser's folder is marked done instead."""
        if self.draining:
            return None
        for job_id in list(self.queue):
            ready = [w for w in self.denoisers.values() if w.credits > 0 and w.identity not in blocked]
            if not ready:
                return None
            job = self.jobs[job_id]
            denoiser = self._choose(job, ready)
            if denoiser is None:
                continue
            images = self.finished.get((job.job_id, denoiser.out_dir, denoiser.settings_id))
            if images is not None:
                self.queue.remove(job_id)
                job.state = JobState.DONE
                self.already_done += 1
                self.log("done", job.job_id, out_dir=denoiser.out_dir, settings=denoiser.settings_id, images=images,
                         reused=True)
                continue
            return job, denoiser
        return None

    def _choose(self, job: JobRecord, ready: list[DenoiserRecord]) -> DenoiserRecord | None:
        """The freest denoiser that has not failed this job; one that has, only if no other is alive; never one that
        said it cannot render it."""
        ready = [w for w in ready if w.key not in job.refused_by]
        fresh = [w for w in ready if w.identity not in job.failed_on]
        if not fresh and (self._untried(job) or any(identity not in job.failed_on for identity in self.coming)):
            return None  # wait for a denoiser that has not failed it yet (maybe one still loading)
        pool = fresh or ready
        return max(pool, key=lambda w: (w.credits, -len(w.inflight))) if pool else None

    def _untried(self, job: JobRecord) -> list[DenoiserRecord]:
        """Attached denoisers that may still take this job: not one that failed it, nor one that said it cannot
        (by key: it may have reconnected since)."""
        return [other for identity, other in self.denoisers.items()
                if identity not in job.failed_on and other.key not in job.refused_by]

    def sent(self, job: JobRecord, denoiser: DenoiserRecord, now: float) -> None:
        if not denoiser.inflight:
            denoiser.last_progress = now  # an idle denoiser's clock starts with its job
        self.queue.remove(job.job_id)
        job.attempt += 1
        job.state, job.held_by = JobState.DISPATCHED, denoiser.identity
        denoiser.credits -= 1
        denoiser.inflight.add(job.job_id)
        self.log("dispatched", job.job_id, attempt=job.attempt, worker=denoiser.name)

    def unsendable(self, job: JobRecord, reason: str) -> None:
        """Its embeddings cannot be read any more: nobody could render it."""
        self.queue.remove(job.job_id)
        self._bury(job, f"embeddings unavailable: {reason}")

    # ---- reports ----
    def _owned(self, denoiser: DenoiserRecord, job_id: str, attempt: int, now: float) -> JobRecord | None:
        """The job if this report is about its current attempt on this denoiser. A late report, about an attempt
        that was re-queued elsewhere, only returns the credit."""
        if job_id in denoiser.inflight:
            denoiser.inflight.discard(job_id)
            denoiser.credits += 1
            denoiser.last_progress = now
        job = self.jobs.get(job_id)
        if (job is None or job.state is not JobState.DISPATCHED or job.attempt != attempt
                or job.held_by != denoiser.identity):
            return None
        return job

    def finish(self, identity: bytes, job_id: str, attempt: int, images: list[dict], seconds: float,
               now: float = 0.0) -> bool:
        """DONE; False when it was late or not this denoiser's to report."""
        denoiser = self.denoisers.get(identity)
        job = self._owned(denoiser, job_id, attempt, now) if denoiser else None
        if job is None:
            return False
        denoiser.slowest_job_s = max(denoiser.slowest_job_s, seconds)
        denoiser.finished_jobs += 1
        job.state, job.held_by = JobState.DONE, None
        self.log("done", job.job_id, attempt=attempt, worker=denoiser.name, seconds=seconds, out_dir=denoiser.out_dir,
                 settings=denoiser.settings_id, images=images)
        return True

    def fail(self, identity: bytes, job_id: str, attempt: int, reason: str, scope: str = "job",
             now: float = 0.0) -> bool:
        """ERROR: the job is retried on another denoiser. A "job" error counts towards dead-lettering it after
        max_attempts (unless the peer never finished a job and an attached one that has not tried this one has);
        a "denoiser" one (a LoRA it lacks, a full disk) means only that this denoiser cannot
        render it: it never goes back there, and waits for one that can (see stranded)."""
        denoiser = self.denoisers.get(identity)
        job = self._owned(denoiser, job_id, attempt, now) if denoiser else None
        if job is None:
            return False
        job.failed_on.add(identity)
        self.log("failed", job.job_id, attempt=attempt, worker=denoiser.name, reason=reason, scope=scope)
        if scope != "job":
            job.refused_by[denoiser.key] = reason
        else:
            # A peer that never finished a job is not believed against a job that an attached denoiser which has
            # finished jobs has not tried: a peer failing jobs under a new connection each time would otherwise
            # bury good jobs beside a healthy one.
            if denoiser.finished_jobs or not any(other.finished_jobs for other in self._untried(job)):
                job.failures += 1
            if not denoiser.finished_jobs:
                denoiser.failed_jobs.add(job_id)
        self._retry_or_bury(job, reason)
        if scope == "job" and len(denoiser.failed_jobs) >= QUARANTINE_STRIKES and denoiser.key not in self.quarantined:
            # One poison job failing again and again on the only denoiser counts once; a GPU that fails every
            # job it is given, and has never finished one, is what is broken.
            self._quarantine(denoiser, f"it failed {len(denoiser.failed_jobs)} different jobs and finished none")
        return True

    def stranded(self) -> list[JobRecord]:
        """Queued jobs that every attached denoiser has refused, while no other is on its way: only a denoiser
        that has not come yet could render them."""
        if self.coming or not self.denoisers:
            return []
        keys = {denoiser.key for denoiser in self.denoisers.values()}
        return [self.jobs[job_id] for job_id in self.queue if keys <= set(self.jobs[job_id].refused_by)]

    def give_up_stranded(self) -> None:
        """Bury the stranded jobs, each with what the denoisers that refused it said."""
        for job in self.stranded():
            self.queue.remove(job.job_id)
            self._bury(job, "no denoiser could render it: " + "; ".join(sorted(set(job.refused_by.values()))))

    def _retry_or_bury(self, job: JobRecord, reason: str) -> None:
        job.held_by = None
        # A job that takes down denoiser after denoiser (OOM, say) is given up too, with more leeway, since a
        # denoiser can also die for reasons of its own; one flapping peer counts once, however often it comes.
        if job.failures >= self.max_attempts or len(job.lost_on) >= 2 * self.max_attempts:
            self._bury(job, reason)
        else:
            job.state = JobState.QUEUED
            self.queue.insert(0, job.job_id)
            self.log("requeued", job.job_id, attempt=job.attempt, reason=reason,
                     **({"stopping": True} if self.draining else {}))

    def _bury(self, job: JobRecord, reason: str) -> None:
        job.state, job.held_by = JobState.DEAD, None
        self.log("dead_letter", job.job_id, attempts=job.attempt, reason=reason)
        self.report(f"gave up on line {job.entry.line} ({job.entry.prompt[:50]!r}) after "
                    f"{plural(job.attempt, 'attempt')}: {reason}")

    def cancel(self, job_id: str) -> tuple[bytes, int] | None:
        """Nobody wants this job any more: it leaves the queue, or, out on a denoiser, is left to end there; (that
        denoiser, the attempt) to tell it, or None. A report about it later only returns the credit."""
        job = self.jobs.get(job_id)
        if job is None or job.state not in (JobState.QUEUED, JobState.DISPATCHED):
            return None
        holder = (job.held_by, job.attempt) if job.state is JobState.DISPATCHED and job.held_by is not None else None
        if job.state is JobState.QUEUED:
            self.queue.remove(job_id)
        job.state, job.held_by = JobState.CANCELLED, None
        self.log("cancelled", job_id)
        return holder

    def progressed(self, identity: bytes, job_id: str, attempt: int, now: float) -> bool:
        """A step of a job this denoiser holds: it is working, whatever its deadline says."""
        denoiser = self.denoisers.get(identity)
        job = self.jobs.get(job_id)
        if denoiser is None or job is None or job.state is not JobState.DISPATCHED or job.held_by != identity \
                or job.attempt != attempt:
            return False
        denoiser.last_progress = now
        return True

    def forget(self, job_id: str) -> None:
        """Drop an ended job (done, dead or cancelled): a server that runs for weeks keeps no record of each."""
        job = self.jobs.get(job_id)
        if job is not None and job.state not in (JobState.QUEUED, JobState.DISPATCHED):
            del self.jobs[job_id]

    def leftovers(self) -> list[JobRecord]:
        """Jobs neither done nor dead-lettered: queued, or out on a denoiser."""
        return [job for job in self.jobs.values() if job.state in (JobState.QUEUED, JobState.DISPATCHED)]
