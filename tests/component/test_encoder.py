"""Component layer: `sdxl-split encode` on the tiny model fills the cache with diffusers' exact tensors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli
from diffusers import StableDiffusionXLPipeline
from encoder_kit import (
    ENTRIES,
    ROWS,
    N,
    cache_path,
    encode_json,
    filled_cache,
    fork_cache,
    header_metadata,
    load_record,
    settings_for,
    write_jsonl,
)
from safetensors import safe_open

from sdxl_split.shared.embeddings import TENSOR_NAMES


@pytest.fixture(scope="module")
def base(tmp_path_factory, session_cache: Path) -> dict:
    return filled_cache(tmp_path_factory, session_cache)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path):
    """diffusers' own encode_prompt, one prompt per call, memoised per (row, clip_skip)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    memo: dict[tuple[int, int | None], dict[str, torch.Tensor]] = {}

    def encode(index: int, clip_skip: int | None) -> dict[str, torch.Tensor]:
        if (index, clip_skip) not in memo:
            entry = ENTRIES[index]
            with torch.inference_mode():
                outputs = pipe.encode_prompt(
                    prompt=entry.prompt, prompt_2=entry.prompt_2, negative_prompt=entry.negative_prompt,
                    negative_prompt_2=entry.negative_prompt_2, device="cpu", num_images_per_prompt=1,
                    do_classifier_free_guidance=True, clip_skip=clip_skip,
                )
            memo[(index, clip_skip)] = dict(zip(TENSOR_NAMES, outputs))
        return memo[(index, clip_skip)]

    return encode


def test_encoder_never_builds_or_reads_a_unet_or_vae(base: dict) -> None:
    done = base["done"]
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)["stats"]
    assert stats["models_loaded"] is True and stats["encoded"] == N
    folders = {Path(path).parent.name for path in base["opened"]}
    # The recorder saw the text encoders load, so an absent unet/vae is real evidence.
    assert {"text_encoder", "text_encoder_2"} <= folders
    assert not folders & {"unet", "vae", "vae_tiny"}, base["opened"]


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_cached_tensors_equal_diffusers_encode_prompt(base: dict, reference, tmp_path: Path,
                                                      clip_skip: int | None) -> None:
    cache = base["cache"]
    if clip_skip is not None:
        cache = fork_cache(cache, tmp_path / "cache")
        stats, _ = encode_json(cache, base["prompts"], "--clip-skip", str(clip_skip))
        # clip_skip is part of every key: nothing from the default run may be reused.
        assert (stats["hits"], stats["encoded"]) == (0, N)
    settings = settings_for(cache, clip_skip=clip_skip)
    for index, entry in enumerate(ENTRIES):
        record = load_record(cache, entry, settings)
        expected = reference(index, clip_skip)
        if clip_skip is not None:
            # Otherwise a CLI that ignored --clip-skip would pass too.
            assert not torch.equal(expected["prompt_embeds"], reference(index, None)["prompt_embeds"])
        for name in TENSOR_NAMES:
            assert record.tensors[name].dtype == torch.float32
            assert torch.equal(record.tensors[name], expected[name]), f"line {entry.line}: {name} differs"


def test_batched_encode_is_within_float_noise_of_diffusers(cli, cache_dir: Path, tmp_path: Path,
                                                           reference) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    done = cli("--model", "tiny", "encode", str(prompts), "--batch-size", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stats"]["encoded"] == N
    settings = settings_for(cache_dir)
    for index, entry in enumerate(ENTRIES):
        record = load_record(cache_dir, entry, settings)
        for name in TENSOR_NAMES:
            assert torch.allclose(record.tensors[name], reference(index, None)[name], rtol=0, atol=1e-6), name


def test_missing_negative_is_stored_as_zeros(base: dict) -> None:
    settings = settings_for(base["cache"])
    for entry in ENTRIES:
        path = cache_path(base["cache"], entry, settings)
        with safe_open(str(path), framework="pt") as handle:
            assert sorted(handle.keys()) == sorted(TENSOR_NAMES)
        tensors = load_record(base["cache"], entry, settings).tensors
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            positive = tensors[name.removeprefix("negative_")]
            assert tensors[name].shape == positive.shape
            # force_zeros_for_empty_prompt: zeros exactly when the line gave no negative.
            assert bool(torch.count_nonzero(tensors[name]) == 0) == (entry.negative_prompt is None), name


def test_long_prompt_warns_with_dropped_text_and_is_marked_truncated(base: dict) -> None:
    warnings = [line for line in base["done"].stderr.splitlines() if "77 tokens" in line]
    assert len(warnings) == 1
    assert "line 5: prompt" in warnings[0] and "dropped: 'cat cat cat cat cat zebra giraffe'" in warnings[0]
    settings = settings_for(base["cache"])
    flags = [header_metadata(cache_path(base["cache"], entry, settings))["truncated"] for entry in ENTRIES]
    assert flags == ["false"] * (N - 1) + ["true"]


def test_rerun_is_all_hits_without_loading_a_model(base: dict) -> None:
    stats, stderr = encode_json(base["cache"], base["prompts"])
    assert (stats["hits"], stats["encoded"], stats["models_loaded"]) == (N, 0, False)
    assert "loading text encoders" not in stderr


def _every_negative(rows: list[dict], negative: str) -> list[dict]:
    return [{**row, "negative_prompt": negative} for row in rows]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param("model", marks=pytest.mark.slow),
        "negative_prompt",
        "encoder_dtype",
    ],
)
def test_changing_a_key_input_misses_every_entry(base: dict, tmp_path: Path, change: str) -> None:
    # clip_skip is the fourth key input; the parity test checks that it misses too.
    cache = fork_cache(base["cache"], tmp_path / "cache")
    prompts, flags, model = base["prompts"], [], "tiny"
    if change == "model":
        other = tmp_path / "other-tiny"
        built = invoke_cli("model", "init", "tiny", str(other), "--seed", "1", cache=cache)
        assert built.returncode == 0, built.stderr
        model = str(other)
    elif change == "negative_prompt":
        prompts = write_jsonl(tmp_path / "negatives.jsonl", _every_negative(ROWS, "grainy"))
    else:
        flags = ["--encoder-dtype", "bf16"]
    stats, _ = encode_json(cache, prompts, *flags, model=model)
    assert (stats["hits"], stats["encoded"], stats["bad_cache_files"]) == (0, N, 0)
    if change == "encoder_dtype":
        record = load_record(cache, ENTRIES[0], settings_for(cache, dtype="bf16"))
        assert {t.dtype for t in record.tensors.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_bad_prompt_files_fail_in_one_line_and_write_nothing(cli, cache_dir: Path, tmp_path: Path) -> None:
    files = {
        "latin1.txt": "a cat\ncaf\u00e9\n".encode("latin-1"),
        "nul.txt": b"a cat\na\x00dog\n",
        "bad.jsonl": b'{"prompt": "a cat"}\n{"prompt": "a dog",}\n',
        "empty.txt": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    # Each run is mostly interpreter start-up; run them side by side.
    with ThreadPoolExecutor(len(files)) as pool:
        runs = dict(zip(files, pool.map(lambda name: cli("--model", "tiny", "encode", str(tmp_path / name)),
                                        files)))
    for name, done in runs.items():
        assert done.returncode != 0, name
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and str(tmp_path / name) in lines[0], done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (cache_dir / "embeddings").exists()
