"""The dispatch core driven directly: no model, no process, no socket."""

from __future__ import annotations

import pytest

from sdxl_split.encoder_service.job_table import JobState, JobTable, connection_key
from sdxl_split.shared.prompts import PromptEntry

A, B = b"denoiser-a", b"denoiser-b"
IMAGES = [{"file": "x.png", "sha256": "0" * 64}]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []
        self.reports: list[str] = []

    def log(self, event: str, job_id: str, **fields) -> None:
        self.events.append((event, job_id, fields))

    def named(self, event: str) -> list[str]:
        return [work for name, work, _ in self.events if name == event]


def table_with(jobs: int = 3, max_attempts: int = 2, finished=None) -> tuple[JobTable, Recorder]:
    seen = Recorder()
    table = JobTable(max_attempts, log=seen.log, report=seen.reports.append, finished=finished)
    for n in range(jobs):
        table.add(f"job{n}", PromptEntry(line=n + 1, prompt=f"prompt {n}"), f"key{n}")
    return table, seen


def send_all(table: JobTable, now: float = 0.0) -> list[tuple[str, bytes]]:
    out = []
    while (pick := table.pick()) is not None:
        job, denoiser = pick
        table.sent(job, denoiser, now=now)
        out.append((job.job_id, denoiser.identity))
    return out


def test_jobs_go_out_only_against_credit_and_a_done_returns_it() -> None:
    table, seen = table_with(jobs=3)
    assert table.pick() is None  # nobody attached
    table.attach(A, "a", credits=2, now=0.0)
    assert send_all(table) == [("job0", A), ("job1", A)]
    assert table.counts() == {"queued": 1, "dispatched": 2, "done": 0, "dead": 0, "cancelled": 0}
    assert table.finish(A, "job0", 1, IMAGES, 1.5)
    assert send_all(table) == [("job2", A)]
    assert seen.named("dispatched") == ["job0", "job1", "job2"] and seen.named("done") == ["job0"]


def test_the_freest_denoiser_gets_the_next_job() -> None:
    table, _ = table_with(jobs=3)
    table.attach(A, "a", credits=1, now=0.0)
    table.attach(B, "b", credits=2, now=0.0)
    assert [w for _, w in send_all(table)] == [B, A, B]


def test_a_late_done_after_a_requeue_only_returns_its_credit() -> None:
    table, seen = table_with(jobs=1)
    table.attach(A, "a", credits=1, now=0.0)
    send_all(table)
    table.lose(A, "a missed heartbeats")
    assert table.jobs["job0"].state is JobState.QUEUED and seen.named("requeued") == ["job0"]
    table.attach(B, "b", credits=1, now=1.0)
    assert send_all(table) == [("job0", B)]
    # A comes back and reports attempt 1, which was re-queued: ignored; B's attempt 2 counts.
    table.attach(A, "a", credits=1, now=2.0)
    assert not table.finish(A, "job0", 1, IMAGES, 1.0)
    assert table.jobs["job0"].state is JobState.DISPATCHED
    assert table.finish(B, "job0", 2, IMAGES, 1.0) and table.jobs["job0"].state is JobState.DONE


def test_a_done_from_a_denoiser_that_does_not_hold_the_job_is_ignored() -> None:
    table, seen = table_with(jobs=1)
    table.attach(A, "a", credits=1, now=0.0)
    table.attach(B, "b", credits=1, now=0.0)
    [(_, holder)] = send_all(table)
    other = B if holder == A else A
    assert not table.finish(other, "job0", 1, IMAGES, 1.0)
    assert not table.fail(other, "job0", 1, "lying")
    assert table.denoisers[other].credits == 1  # no credit conjured for a job it never held
    assert table.jobs["job0"].state is JobState.DISPATCHED and seen.named("done") == []
    assert not table.finish(b"stranger", "job0", 1, IMAGES, 1.0)
    assert not table.finish(holder, "no-such-job", 1, IMAGES, 1.0)


def test_a_failed_job_goes_to_another_denoiser_and_is_dead_lettered_at_the_retry_cap() -> None:
    table, seen = table_with(jobs=1, max_attempts=2)
    table.attach(A, "a", credits=1, now=0.0)
    table.attach(B, "b", credits=1, now=0.0)
    [(_, first)] = send_all(table)
    assert table.fail(first, "job0", 1, "CUDA out of memory")
    [(_, second)] = send_all(table)
    assert second != first, "a failed job must go to a denoiser that has not failed it"
    assert table.fail(second, "job0", 2, "CUDA out of memory")
    assert table.jobs["job0"].state is JobState.DEAD and seen.named("dead_letter") == ["job0"]
    assert "gave up on line 1" in seen.reports[-1] and table.outstanding == 0
    assert table.counts()["dead"] == 1


def test_a_job_failed_by_the_only_live_denoiser_still_runs_there_but_waits_for_a_fresh_one() -> None:
    table, _ = table_with(jobs=1, max_attempts=3)
    table.attach(A, "a", credits=1, now=0.0)
    send_all(table)
    table.fail(A, "job0", 1, "flaky")
    assert send_all(table) == [("job0", A)]  # no one else alive: retry where it failed
    table.fail(A, "job0", 2, "flaky")
    table.attach(B, "b", credits=1, now=1.0)
    assert send_all(table) == [("job0", B)]


def test_a_flapping_denoiser_is_quarantined_and_cannot_bury_a_good_job() -> None:
    table, seen = table_with(jobs=1, max_attempts=2)
    for attempt in range(1, 8):  # READY, take the job, vanish; again and again, under one name
        if table.attach(A, "flaky[7]@cpu", credits=1, now=float(attempt)) is None:
            break
        assert send_all(table) == [("job0", A)]
        table.lose(A, "flaky vanished")
    assert connection_key(A) in table.quarantined and any("quarantined" in line for line in seen.reports)
    assert attempt == 4, "refused from the fourth READY on"
    assert table.jobs["job0"].state is JobState.QUEUED and seen.named("dead_letter") == []
    table.attach(B, "good[8]@cpu", credits=1, now=9.0)
    assert send_all(table) == [("job0", B)] and table.finish(B, "job0", 4, IMAGES, 1.0)


def test_a_job_that_takes_down_one_denoiser_after_another_is_dead_lettered() -> None:
    table, seen = table_with(jobs=1, max_attempts=2)
    for n in range(4):  # 2 x max_attempts distinct denoisers, each killed by it (OOM, say)
        identity = f"d{n}".encode()
        table.attach(identity, f"gpu{n}[1]@cuda", credits=1, now=float(n))
        assert send_all(table) == [("job0", identity)]
        table.lose(identity, f"gpu{n} died")
    assert table.jobs["job0"].state is JobState.DEAD and seen.named("dead_letter") == ["job0"]


def test_an_orderly_bye_with_queued_jobs_is_no_strike() -> None:
    table, _ = table_with(jobs=2)
    for n in range(5):
        table.attach(A, "a", credits=2, now=float(n))
        send_all(table)
        table.lose(A, "a left", quiet=True, orderly=True)
    assert not table.quarantined and table.counts()["queued"] == 2


def test_a_denoiser_scoped_error_retries_elsewhere_without_counting_against_the_job() -> None:
    table, _ = table_with(jobs=1, max_attempts=1)
    table.attach(A, "a", credits=1, now=0.0)
    table.attach(B, "b", credits=0, now=0.0)
    send_all(table)
    assert table.fail(A, "job0", 1, "No space left on device writing /out/x.png", scope="denoiser")
    job = table.jobs["job0"]
    assert job.state is JobState.QUEUED and job.failures == 0 and not table.strikes
    table.denoisers[B].credits = 1
    assert send_all(table) == [("job0", B)]
    assert table.fail(B, "job0", 2, "NaN latents")  # a job error: max_attempts 1 buries it
    assert job.state is JobState.DEAD


def test_a_job_a_denoiser_cannot_render_never_goes_back_to_it_and_is_reported_once_stranded() -> None:
    """A denoiser that lacks a job's LoRA is not broken: it keeps rendering other jobs, is not quarantined, and
    never gets that job again; with no denoiser that can take it, the job is buried with what they said."""
    table, seen = table_with(jobs=2, max_attempts=3)
    table.attach(A, "lacking", credits=2, now=0.0)
    send_all(table)
    assert table.fail(A, "job0", 1, "LoRA style is not on this denoiser", scope="denoiser")
    assert table.finish(A, "job1", 1, IMAGES, 1.0)
    assert send_all(table) == [] and table.jobs["job0"].state is JobState.QUEUED
    assert not table.quarantined and A in table.denoisers
    assert [job.job_id for job in table.stranded()] == ["job0"]
    table.heard(B, now=1.0)  # another denoiser is on its way: not stranded yet
    assert table.stranded() == []
    table.attach(B, "having", credits=1, now=2.0)
    assert send_all(table) == [("job0", B)]
    table.fail(B, "job0", 2, "LoRA style is not on this denoiser either", scope="denoiser")
    table.give_up_stranded()
    assert table.jobs["job0"].state is JobState.DEAD and seen.named("dead_letter") == ["job0"]
    assert "no denoiser could render it: LoRA style is not on this denoiser" in seen.reports[-1]


def test_a_peer_renaming_itself_cannot_bury_jobs_while_a_healthy_denoiser_is_attached() -> None:
    """Connect, take a job, vanish, under a new name and connection each time: losses by a peer that never finished
    a job do not count against the job while others are attached."""
    table, seen = table_with(jobs=12, max_attempts=3)
    table.attach(B, "healthy[1]@cpu", credits=1, now=0.0)
    for n in range(24):
        identity = f"hostile-{n}".encode()
        table.attach(identity, f"renamed-{n}[{n}]@cpu", credits=4, now=float(n))  # the freest: it gets the retries
        send_all(table)
        table.lose(identity, "vanished")
        if table.denoisers[B].inflight:
            [job_id] = table.denoisers[B].inflight
            assert table.finish(B, job_id, table.jobs[job_id].attempt, IMAGES, 1.0)
    assert seen.named("dead_letter") == []
    assert table.counts()["dead"] == 0


def test_a_peer_renaming_itself_cannot_bury_jobs_by_failing_them_either() -> None:
    """The same peer, saying ERROR instead of vanishing: a connection that never finished a job is not believed
    against a job the healthy denoiser has not tried."""
    table, seen = table_with(jobs=12, max_attempts=3)
    table.attach(B, "healthy[1]@cpu", credits=1, now=0.0)
    for n in range(24):
        identity = f"hostile-{n}".encode()
        table.attach(identity, f"renamed-{n}[{n}]@cpu", credits=4, now=float(n))
        for job_id, holder in send_all(table):
            if holder == identity:  # after its third failure it is quarantined, and the rest are requeued
                table.fail(identity, job_id, table.jobs[job_id].attempt, "boom")
        table.lose(identity, "left", orderly=True)
        if table.denoisers[B].inflight:
            [job_id] = table.denoisers[B].inflight
            assert table.finish(B, job_id, table.jobs[job_id].attempt, IMAGES, 1.0)
    assert seen.named("dead_letter") == [] and table.counts()["dead"] == 0


def test_a_poison_job_is_still_given_up_beside_a_healthy_denoiser() -> None:
    """A fresh peer's failures are set aside only while a proven denoiser has not tried the job: once it has failed
    there too, every failure counts, and the job is buried instead of bouncing between the two forever."""
    table, seen = table_with(jobs=2, max_attempts=3)
    table.attach(B, "b", credits=1, now=0.0)
    [(fine, _)] = send_all(table)
    assert table.finish(B, fine, 1, IMAGES, 1.0)  # B has proven itself
    table.attach(A, "a", credits=2, now=0.0)  # the freest: the job goes there first
    for _ in range(10):
        if (pick := table.pick()) is None:
            break
        job, denoiser = pick
        table.sent(job, denoiser, now=0.0)
        table.fail(denoiser.identity, job.job_id, job.attempt, "poison")
    poison = next(job for job_id, job in table.jobs.items() if job_id != fine)
    assert seen.named("dead_letter") == [poison.job_id] and poison.attempt == 4  # A's first failure set aside


def test_a_job_refused_by_a_denoiser_that_reconnected_is_not_held_back_for_it() -> None:
    """Under CURVE a refusal follows the key: a denoiser that said it cannot render a job, and came back on a new
    connection, is neither waited for nor counted as one that has yet to try it."""
    table, seen = table_with(jobs=2, max_attempts=2)
    table.attach(A, "a", credits=1, now=0.0, key="curve:A")
    [(job_id, _)] = send_all(table)
    assert table.fail(A, job_id, 1, "no such LoRA here", scope="denoiser")
    table.lose(A, "left", orderly=True)
    again = b"denoiser-a-again"
    table.attach(again, "a", credits=1, now=1.0, key="curve:A")
    [(other, _)] = send_all(table)  # it takes the other job, and finishes it: a proven denoiser
    assert other != job_id and table.finish(again, other, 1, IMAGES, 1.0)
    table.attach(B, "b", credits=1, now=2.0, key="curve:B")
    assert send_all(table) == [(job_id, B)]
    assert table.fail(B, job_id, 2, "boom")
    assert table.jobs[job_id].failures == 1  # A's refusal is no try: B's failure counts
    assert send_all(table) == [(job_id, B)]  # back to B, not held for A
    assert table.fail(B, job_id, 3, "boom") and seen.named("dead_letter") == [job_id]


def test_quarantine_follows_the_curve_key_not_the_name_a_peer_gives() -> None:
    table, _ = table_with(jobs=1, max_attempts=3)
    for n in range(3):
        identity = f"conn-{n}".encode()
        assert table.attach(identity, f"name-{n}", credits=1, now=float(n), key="curve:KEY") is not None
        send_all(table)
        table.lose(identity, "vanished")
    assert table.attach(b"conn-9", "a-new-name", credits=1, now=9.0, key="curve:KEY") is None
    assert table.attach(b"conn-10", "other", credits=1, now=9.0, key="curve:OTHER") is not None


def test_a_denoiser_that_makes_no_progress_is_overdue_by_its_deadline() -> None:
    table, _ = table_with(jobs=3)
    table.job_timeout_s = None
    table.attach(A, "a", credits=1, now=0.0)
    table.attach(B, "b", credits=1, now=0.0)
    send_all(table)
    assert table.overdue(now=1000.0) == []  # the first job may compile: 1800 s
    assert [w.identity for w, _ in table.overdue(now=1801.0)] == [A, B]
    table.finish(A, "job0", 1, IMAGES, 2.0, now=1801.0)  # A's next deadline: max(120, 10 x 2 s)
    send_all(table, now=1801.0)
    late = {w.identity: limit for w, limit in table.overdue(now=1801.0 + 121.0)}
    assert late[A] == 120.0 and late[B] == 1800.0
    table.job_timeout_s = 5.0
    assert [w.identity for w, _ in table.overdue(now=1801.0 + 6.0)] == [A, B]
    assert table.overdue(now=1801.0 + 4.0) == [(table.denoisers[B], 5.0)]


def test_draining_hands_out_nothing_new_but_accepts_what_is_out() -> None:
    table, _ = table_with(jobs=3)
    table.attach(A, "a", credits=1, now=0.0)
    send_all(table)
    table.draining = True
    table.attach(B, "b", credits=5, now=0.0)
    assert table.pick() is None
    assert table.in_flight == 1 and table.finish(A, "job0", 1, IMAGES, 1.0) and table.in_flight == 0
    assert [job.job_id for job in table.leftovers()] == ["job1", "job2"]


def test_images_a_previous_run_left_intact_are_not_rendered_again() -> None:
    finished = {("job1", "/out", "s" * 64): IMAGES}
    table, seen = table_with(jobs=2, finished=finished)
    table.attach(A, "a", credits=4, now=0.0, out_dir="/out", settings_id="s" * 64)
    assert send_all(table) == [("job0", A)]
    assert table.jobs["job1"].state is JobState.DONE and table.already_done == 1
    assert table.counts()["done"] == 0  # nothing was rendered in this run
    # Another folder or other settings would render it afresh.
    other, _ = table_with(jobs=2, finished=finished)
    other.attach(A, "a", credits=4, now=0.0, out_dir="/elsewhere", settings_id="s" * 64)
    assert len(send_all(other)) == 2


def test_silent_denoisers_are_found_and_a_restart_requeues_what_it_held() -> None:
    table, _ = table_with(jobs=2)
    table.attach(A, "a", credits=2, now=0.0)
    table.attach(B, "b", credits=0, now=0.0)
    send_all(table)
    table.heard(B, now=5.0)
    assert [w.identity for w in table.silent(now=5.0, timeout_s=3.0)] == [A]
    table.attach(A, "a", credits=2, now=6.0)  # READY again: it restarted and lost its jobs
    assert table.counts()["queued"] == 2 and table.denoisers[A].inflight == set()


def test_unsendable_jobs_are_dead_lettered_and_duplicates_are_added_once() -> None:
    table, seen = table_with(jobs=1)
    assert not table.add("job0", PromptEntry(line=9, prompt="again"), "key0")
    table.attach(A, "a", credits=1, now=0.0)
    job, _ = table.pick()
    table.unsendable(job, "cache file deleted")
    assert job.state is JobState.DEAD and "embeddings unavailable: cache file deleted" in seen.reports[-1]
    assert table.pick() is None


@pytest.mark.parametrize("credits", [1, 3])
def test_credits_are_never_overdrawn(credits: int) -> None:
    table, _ = table_with(jobs=10)
    table.attach(A, "a", credits=credits, now=0.0)
    assert len(send_all(table)) == credits and table.denoisers[A].credits == 0


def test_a_denoiser_that_fails_every_job_is_quarantined_before_it_sinks_the_queue() -> None:
    table, seen = table_with(jobs=4, max_attempts=3)
    table.attach(A, "broken", credits=4, now=0.0)
    for job_id, _ in send_all(table):
        table.fail(A, job_id, 1, "broken on purpose")
    assert connection_key(A) in table.quarantined and A not in table.denoisers
    assert seen.named("dead_letter") == [] and table.counts()["queued"] == 4
    table.attach(B, "healthy", credits=1, now=1.0)
    for _ in range(4):
        [(job_id, _)] = send_all(table)
        assert table.finish(B, job_id, 2, IMAGES, 1.0)
    assert table.counts()["done"] == 4


def test_one_poison_job_on_the_only_denoiser_is_dead_lettered_without_quarantining_it() -> None:
    table, seen = table_with(jobs=2, max_attempts=3)
    table.attach(A, "only", credits=1, now=0.0)
    for attempt in (1, 2, 3):
        [(job_id, _)] = send_all(table)
        assert job_id == "job0"
        table.fail(A, "job0", attempt, "NaN latents")
    assert seen.named("dead_letter") == ["job0"] and not table.quarantined
    assert send_all(table) == [("job1", A)]


def test_a_failed_job_waits_for_a_denoiser_that_is_still_loading() -> None:
    table, _ = table_with(jobs=1, max_attempts=3)
    table.attach(A, "a", credits=1, now=0.0)
    send_all(table)
    table.heard(B, now=0.5)  # B heartbeats before its READY: its model is loading
    table.fail(A, "job0", 1, "flaky")
    assert table.pick() is None, "it must wait for B, not go back to A"
    table.silent(now=10.0, timeout_s=3.0)  # B went quiet: forgotten, so A may retry it
    table.heard(A, now=10.0)
    assert send_all(table) == [("job0", A)]
