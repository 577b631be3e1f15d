"""The Ray engine's parts without Ray (tiny model, in this process): the driver's plan finds finished work by
name and hash, and the stage classes pass records as validated JOB frames and fail as rows, not exceptions."""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.naming import batch_files
from sdxl_split.denoiser_service.spec import DenoiserSpec, model_identity
from sdxl_split.denoiser_service.work_plan import plan_jobs
from sdxl_split.encoder_service.config import EncodeConfig
from sdxl_split.ray_engine.stages import DenoiseStage, DenoiseStageSpec, EncodeStage, EncodeStageSpec
from sdxl_split.shared import specs
from sdxl_split.shared.encoding_settings import encoding_settings, entry_key
from sdxl_split.shared.models.resolve import resolve_model
from sdxl_split.shared.prompt_extras import ExtrasSpec
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.wire_fields import entry_json

PROBE = ".probe"


@pytest.fixture()
def setup(cache_dir: Path, tmp_path: Path):
    source = resolve_model("tiny", cache_dir)
    config = RenderConfig(out_dir=tmp_path / "out", width=64, height=64, steps=2, images_per_prompt=2)
    config.out_dir.mkdir()
    for folder in (cache_dir, config.out_dir):
        (folder / PROBE).write_text("")
    settings = encoding_settings(source, cache_dir, "fp32", None)
    identity = model_identity(source, cache_dir)
    encode = EncodeStageSpec(source=source, settings=settings, config=EncodeConfig(threads=1), cache_dir=cache_dir,
                             extras=ExtrasSpec(), probe=PROBE)
    denoise = DenoiseStageSpec(denoiser=DenoiserSpec(source=source, identity=identity, config=config,
                                                     cache_dir=cache_dir, threads=1), probe=PROBE)
    return encode, denoise


def entries(*prompts: str) -> tuple[PromptEntry, ...]:
    return tuple(PromptEntry(line=n + 1, prompt=text) for n, text in enumerate(prompts))


def plan(encode: EncodeStageSpec, denoise: DenoiseStageSpec, lines: tuple[PromptEntry, ...]):
    return plan_jobs(lines, encode.settings, encode.extras.resolver(encode.cache_dir), denoise.denoiser.config,
                     denoise.denoiser.identity)


def test_the_plan_keeps_intact_images_and_sets_aside_changed_ones(setup):
    encode, denoise = setup
    lines = entries("a fox", "an owl", "a fox")
    first = plan(encode, denoise, lines)
    assert [job.entry.prompt for job in first.todo] == ["a fox", "an owl"] and first.repeated_lines == 1
    # The names the plan expects are the ones the renderer will write.
    config, identity = denoise.denoiser.config, denoise.denoiser.identity
    fox = first.todo[0]
    assert fox.files == batch_files(entry_key(fox.entry, encode.settings), fox.entry, config, identity)[3]

    out = config.out_dir
    with (out / "manifest.jsonl").open("w") as manifest:
        for name in fox.files:
            (out / name).write_bytes(name.encode())
            manifest.write(json.dumps({"file": name, "sha256": hashlib.sha256(name.encode()).hexdigest()}) + "\n")
    second = plan(encode, denoise, lines)
    assert [job.entry.prompt for job in second.todo] == ["an owl"] and second.done_images == 2

    (out / fox.files[1]).write_bytes(b"flipped bits")
    third = plan(encode, denoise, lines)
    assert [job.entry.prompt for job in third.todo] == ["a fox", "an owl"]
    assert third.set_aside == [out / (fox.files[1] + ".corrupt")] and not (out / fox.files[1]).exists()


def batch_of(lines: tuple[PromptEntry, ...], encode: EncodeStageSpec, denoise: DenoiseStageSpec) -> dict:
    todo = plan(encode, denoise, lines).todo
    return {"job_id": [job.job_id for job in todo], "entry": [json.dumps(entry_json(job.entry)) for job in todo]}


def test_records_travel_as_job_frames_and_a_tampered_one_is_refused(setup):
    encode, denoise = setup
    encoded = EncodeStage(specs.dumps(encode))(batch_of(entries("a fox", "an owl"), encode, denoise))
    assert not any(encoded["fatal"]) and not any(encoded["error"])
    payload = bytearray(encoded["record"][1])
    payload[-1] ^= 0xFF  # the last byte of the last tensor: the frames still parse, the record must not pass
    encoded["record"][1] = bytes(payload)
    stage = DenoiseStage(specs.dumps(denoise))
    rendered = stage(encoded)
    fox_files = [name for name, error in zip(rendered["file"], rendered["error"]) if not error]
    assert len(fox_files) == 2 and all((denoise.denoiser.config.out_dir / name).is_file() for name in fox_files)
    refused = [error for error in rendered["error"] if error]
    assert len(refused) == 1 and refused[0].startswith("refused the job"), refused
    assert len(list(denoise.denoiser.config.out_dir.glob("*.png"))) == 2
    memory = json.loads(rendered["denoiser_memory"][0])
    assert memory["peak_rss_gib"] > 0 and [p["phase"] for p in memory["phases"]][0] == "load"


def test_a_node_without_the_drivers_folders_or_model_answers_with_a_fatal_row(setup, tmp_path: Path):
    encode, denoise = setup
    batch = batch_of(entries("a fox"), encode, denoise)
    elsewhere = replace(denoise, denoiser=replace(denoise.denoiser,
                                                  config=replace(denoise.denoiser.config, out_dir=tmp_path)))
    rows = DenoiseStage(specs.dumps(elsewhere))({**batch, "fatal": [""], "error": [""]})
    assert "is not the driver's folder on this node" in rows["fatal"][0]

    identity = replace(denoise.denoiser.identity, fingerprint="sha256:" + "0" * 64)
    other_model = replace(denoise, denoiser=replace(denoise.denoiser, identity=identity))
    rows = DenoiseStage(specs.dumps(other_model))({**batch, "fatal": [""], "error": [""]})
    assert "differs from the driver's" in rows["fatal"][0]

    unshared = EncodeStage(specs.dumps(replace(encode, probe=".not-there")))(batch)
    assert not unshared["error"][0] and "is not the driver's folder" in unshared["notes"][0]


def test_an_encoder_stage_outside_a_ray_actor_leaves_its_process_priority_alone(setup):
    """In a Ray actor, a collected EncodeStage lowers its process to nice 19 for the teardown; a test, a notebook or
    any other host process that builds one must keep its own priority."""
    encode, denoise = setup
    before = os.getpriority(os.PRIO_PROCESS, 0)
    stage = EncodeStage(specs.dumps(encode))
    stage(batch_of(entries("a fox"), encode, denoise))
    del stage
    gc.collect()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
