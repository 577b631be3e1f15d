"""The messages serving added to the protocol: a job's own options, PROGRESS with a preview, CANCEL, and DONE
with the PNGs; each round-trips, and what a peer could send wrong is refused."""

from __future__ import annotations

import hashlib
import json

import pytest
from protocol_samples import ENTRY, JOB_ID, make_record

from sdxl_split.encoder_service.job_table import JobState, JobTable
from sdxl_split.shared.image_settings import JobOptions, JobSettings
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.protocol import Cancel, Done, ImageDone, Job, Progress, ProtocolError, decode, encode

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"
OPTIONS = JobOptions(JobSettings(width=512, height=768, steps=30, guidance=6.5, scheduler="euler_a"), 5, True)


def test_a_job_carries_its_own_settings_and_they_round_trip() -> None:
    job = Job.build(JOB_ID, 1, ENTRY, make_record(ENTRY), options=OPTIONS)
    back = decode(encode(job))
    assert back.options == OPTIONS and back.job_id == JOB_ID


@pytest.mark.parametrize("change, words", [
    ({"width": 100}, "multiple of 8"), ({"steps": 0}, "from 1 to 1000"), ({"guidance": float("inf")}, "not JSON"),
    ({"scheduler": "heun"}, "not one of"), ({"shape": "square"}, "unknown field"),
])
def test_job_settings_out_of_bounds_are_refused(change: dict, words: str) -> None:
    frames = encode(Job.build(JOB_ID, 1, ENTRY, make_record(ENTRY), options=OPTIONS))
    header = json.loads(frames[0])
    header["options"]["settings"].update(change)
    with pytest.raises(ProtocolError, match=words):
        decode([json.dumps(header).encode(), frames[1]])


def test_progress_cancel_and_done_with_images_round_trip() -> None:
    for message in (Progress(JOB_ID, 2, 3, 30), Progress(JOB_ID, 1, 30, 30, preview=PNG), Cancel(JOB_ID, 2, "gone"),
                    Done(JOB_ID, 1, (ImageDone("a.png", hashlib.sha256(PNG).hexdigest()),), 1.5, image_bytes=(PNG,))):
        assert decode(encode(message)) == message


def test_what_a_peer_could_send_wrong_is_refused() -> None:
    done = encode(Done(JOB_ID, 1, (ImageDone("a.png", hashlib.sha256(PNG).hexdigest()),), 1.0, image_bytes=(PNG,)))
    with pytest.raises(ProtocolError, match="do not have the sha256"):
        decode([done[0], PNG + b"tampered"])
    with pytest.raises(ProtocolError, match="2 image frames for 1 images"):
        decode([done[0], PNG, PNG])
    with pytest.raises(ProtocolError, match="preview must be a PNG"):
        decode(encode(Progress(JOB_ID, 1, 1, 2))[:1] + [b"GIF89a"])
    with pytest.raises(ProtocolError, match="step must be from 0 to 2"):
        decode([encode(Progress(JOB_ID, 1, 1, 2))[0].replace(b'"step":1', b'"step":9')])


def test_a_cancelled_job_leaves_the_queue_or_its_denoiser_and_a_late_report_only_returns_credit() -> None:
    table = JobTable(3, log=lambda *a, **k: None, report=lambda m: None)
    for n in range(2):
        table.add(f"job{n}", PromptEntry(line=n + 1, prompt=f"p{n}"), f"key{n}")
    table.attach(b"a", "a", credits=1, now=0.0)
    job, denoiser = table.pick()
    table.sent(job, denoiser, now=0.0)
    assert table.cancel("job1") is None and "job1" not in table.queue  # still queued: just dropped
    assert table.cancel("job0") == (b"a", 1)  # out on a denoiser: tell it
    assert table.jobs["job0"].state is JobState.CANCELLED and table.outstanding == 0
    assert not table.progressed(b"a", "job0", 1, now=1.0)
    assert not table.fail(b"a", "job0", 1, "cancelled by the encoder") and table.denoisers[b"a"].credits == 1
    table.forget("job0")
    assert "job0" not in table.jobs


def test_a_denoiser_lost_while_holding_a_cancelled_and_forgotten_job_is_no_error() -> None:
    """The serve loop forgets a cancelled job at once; the denoiser that held it may die before it answers."""
    table = JobTable(3, log=lambda *a, **k: None, report=lambda m: None)
    table.add("job0", PromptEntry(line=1, prompt="p"), "key0")
    table.attach(b"a", "a", credits=1, now=0.0)
    job, denoiser = table.pick()
    table.sent(job, denoiser, now=0.0)
    table.cancel("job0")
    table.forget("job0")
    table.lose(b"a", "denoiser a died")
    assert "job0" not in table.jobs and not table.queue and b"a" not in table.denoisers
