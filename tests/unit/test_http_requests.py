"""What the HTTP server makes of a request before any model: A1111's sampler names, the infotext read back, and a
request checked against the bounds every other way in shares."""

from __future__ import annotations

import pytest

from sdxl_split.http_service.asks import Defaults, FieldProblem, check_ask
from sdxl_split.http_service.infotext import parse_infotext
from sdxl_split.http_service.samplers import UnknownSampler, scheduler_for
from sdxl_split.shared.image_settings import JobSettings

DEFAULTS = Defaults(width=1024, height=1024, steps=25, guidance=5.0, scheduler="euler", syntax="a1111",
                    preview_every=5)


@pytest.mark.parametrize("sampler, schedule, ours", [
    ("Euler a", "automatic", "euler_a"),  # webuiapi's defaults
    ("Euler", None, "euler"),
    ("k_euler", "Automatic", "euler"),
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
    ("DPM++ 2M", "automatic", "dpmpp_2m_karras"),  # A1111 runs DPM++ 2M with Karras sigmas by default
    ("DPM++ 2M", "uniform", "dpmpp_2m"),
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),  # the older combined name
    (None, None, "euler"),
])
def test_a1111_sampler_names_map_to_our_schedulers(sampler, schedule, ours) -> None:
    assert scheduler_for(sampler, schedule) == ours


@pytest.mark.parametrize("sampler, schedule, words", [
    ("Heun", None, r"sampler .Heun. is not one of Euler, Euler a, DPM\+\+ 2M, DDIM, UniPC"),
    ("Euler", "Karras", "runs with the schedule types Automatic, not Karras"),
    ("Euler", "exponential", "scheduler 'exponential' is not one of"),
])
def test_a_sampler_this_server_does_not_run_is_named_with_what_it_does(sampler, schedule, words) -> None:
    with pytest.raises(UnknownSampler, match=words):
        scheduler_for(sampler, schedule)


def test_the_infotext_reads_back_as_a1111_reads_it() -> None:
    text = ("a (red:1.2) fox, night\nNegative prompt: blurry\nSteps: 25, Sampler: Euler a, CFG scale: 7.0, Seed: 42, "
            'Size: 832x1216, Model hash: 0123456789, Model: sdxl, Lora hashes: "style: ad73b9acd6e4, x: 012345678901"')
    fields = parse_infotext(text)
    assert fields["Prompt"] == "a (red:1.2) fox, night" and fields["Negative prompt"] == "blurry"
    assert (fields["Steps"], fields["Sampler"], fields["Seed"]) == ("25", "Euler a", "42")
    assert (fields["Size-1"], fields["Size-2"]) == ("832", "1216")
    assert fields["Lora hashes"] == "style: ad73b9acd6e4, x: 012345678901"
    assert parse_infotext("just a prompt, with: a colon") == {"Prompt": "just a prompt, with: a colon",
                                                             "Negative prompt": ""}


def ask(**fields):
    base = {"prompt": "a fox", "negative_prompt": None, "seed": 7, "batch_size": 2, "batches": 3, "width": None,
            "height": None, "steps": None, "guidance": None, "scheduler": None, "clip_skip": None}
    return check_ask({**base, **fields}, DEFAULTS, {"batches": "n_iter", "guidance": "cfg_scale"})


def test_a_request_becomes_one_job_per_batch_with_consecutive_seeds() -> None:
    checked = ask()
    assert checked.settings == JobSettings(1024, 1024, 25, 5.0, "euler") and checked.seeds == [7, 8, 9, 10, 11, 12]
    generation = checked.generation("r1", "a1111")
    assert [(e.line, e.seed, e.count, e.syntax) for e in generation.entries] == [(1, 7, 2, "a1111"),
                                                                                (2, 9, 2, "a1111"),
                                                                                (3, 11, 2, "a1111")]
    assert generation.options.return_images and generation.options.preview_every == 5
    assert 0 <= ask(seed=-1).seed < 2**32 and ask(seed=None).seed >= 0


@pytest.mark.parametrize("fields, field, words", [
    ({"width": 100}, "width", "multiple of 8"),
    ({"guidance": 1e9}, "cfg_scale", "must be from 0 to 100"),
    ({"steps": 0}, "steps", "from 1 to 1000"),
    ({"batches": 40}, "n_iter", "80 images in one request"),
    ({"prompt": "  "}, "prompt", "must not be empty"),
    ({"seed": -5}, "seed", r"must be -1 \(random\)"),
    ({"scheduler": "heun"}, "scheduler", "is not one of"),
])
def test_a_bad_field_is_named_with_the_reason(fields, field, words) -> None:
    with pytest.raises(FieldProblem, match=words) as refused:
        ask(**fields)
    assert refused.value.field == field
