"""Component layer: `sdxl-split encode` on the tiny model fills the cache with diffusers' exact tensors."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import cli_env, invoke_cli
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl_split.cli.cache_cmd import Duration, DurationError
from sdxl_split.cli.main import cli as cli_group
from sdxl_split.shared.embedding_cache import EmbeddingCache, Hit
from sdxl_split.shared.embeddings import TENSOR_NAMES, Embeddings, EncodingSettings, embedding_key, encoding_settings
from sdxl_split.shared.models.resolve import resolve_model
from sdxl_split.shared.prompts import PromptEntry

LONG_PROMPT = " ".join(["cat"] * 80) + " zebra giraffe"
ROWS: list[dict] = [
    {"prompt": "a photo of a cat"},
    {"prompt": "a red car at night", "negative_prompt": "blurry"},
    {"prompt": "a house", "prompt_2": "oil painting, impasto", "negative_prompt": "ugly",
     "negative_prompt_2": "low quality"},
    {"prompt": "a tree", "prompt_2": "watercolor"},
    {"prompt": LONG_PROMPT},
]
ENTRIES = [PromptEntry(line=number, **row) for number, row in enumerate(ROWS, start=1)]
N = len(ROWS)

# Runs `sdxl-split` in a process where building a UNet or VAE raises, recording every safetensors
# file opened. The patches go in before anything imports diffusers or transformers, so the names
# those libraries bind at import time are the recording ones.
NO_DENOISER_SCRIPT = """
import json, os, sys
import safetensors, safetensors.torch
opened = []
real_load_file, real_safe_open = safetensors.torch.load_file, safetensors.safe_open
def load_file(filename, *args, **kwargs):
    opened.append(str(filename))
    return real_load_file(filename, *args, **kwargs)
def safe_open(filename, *args, **kwargs):
    opened.append(str(filename))
    return real_safe_open(filename, *args, **kwargs)
safetensors.torch.load_file = load_file
safetensors.safe_open = safe_open
import diffusers
def refuse(self, *args, **kwargs):
    raise RuntimeError("the encoder built a " + type(self).__name__)
for name in ("UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny"):
    getattr(diffusers, name).__init__ = refuse
from sdxl_split.cli.main import main
try:
    main(sys.argv[1:])
finally:
    with open(os.environ["OPENED_LOG"], "w") as log:
        json.dump(opened, log)
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def encode_json(cache: Path, prompts: Path, *flags: str, model: str = "tiny") -> tuple[dict, str]:
    """Run the real CLI (in this process) with --json; return its stats and stderr."""
    done = invoke_cli("--model", model, "encode", str(prompts), "--json", *flags, cache=cache)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["stats"], done.stderr


def settings_for(cache: Path, model: str = "tiny", dtype: str = "fp32", clip_skip: int | None = None
                 ) -> EncodingSettings:
    """The key settings exactly as `encode` derives them."""
    return encoding_settings(resolve_model(model, cache), cache, dtype, clip_skip)


def cache_path(cache: Path, entry: PromptEntry, settings: EncodingSettings) -> Path:
    return EmbeddingCache(cache / "embeddings").path_for(embedding_key(entry.texts(), settings))


def load_record(cache: Path, entry: PromptEntry, settings: EncodingSettings) -> Embeddings:
    found = EmbeddingCache(cache / "embeddings").lookup(embedding_key(entry.texts(), settings))
    assert isinstance(found, Hit), f"no valid cache file for line {entry.line}: {found}"
    return found.record


def header_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def fork_cache(source: Path, target: Path) -> Path:
    """A private copy of a populated cache (the model stays a symlink) for a test that changes it."""
    shutil.copytree(source, target, symlinks=True)
    return target


def cache_cli(cache: Path, *args: str) -> Result:
    """`sdxl-split cache ...` in-process: nothing here needs a fresh interpreter."""
    return CliRunner().invoke(cli_group, ["--cache-dir", str(cache), "cache", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory, session_cache: Path) -> dict:
    """One cache filled with ROWS by an encode whose process cannot build a UNet or VAE."""
    root = tmp_path_factory.mktemp("encoder")
    cache = root / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "tiny").symlink_to(session_cache / "models" / "tiny")
    prompts = write_jsonl(root / "prompts.jsonl", ROWS)
    log = root / "opened.json"
    done = subprocess.run(
        [sys.executable, "-c", NO_DENOISER_SCRIPT, "--model", "tiny", "encode", str(prompts), "--json"],
        capture_output=True, text=True, timeout=300,
        env=cli_env(cache, OPENED_LOG=str(log)),
    )
    return {"cache": cache, "prompts": prompts, "done": done, "opened": json.loads(log.read_text())}


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


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _wrong_shape(path: Path) -> None:
    """Same names, dtypes and metadata (so the key still matches), but prompt_embeds one column short."""
    metadata = header_metadata(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["prompt_embeds"] = tensors["prompt_embeds"][..., :-1].contiguous()
    save_file(tensors, str(path), metadata=metadata)


def test_bad_cache_files_are_detected_reported_and_reencoded(base: dict, tmp_path: Path) -> None:
    cache = fork_cache(base["cache"], tmp_path / "cache")
    settings = settings_for(cache)
    originals = {entry.line: load_record(cache, entry, settings).tensors for entry in ENTRIES}
    damaged = {}
    for entry, damage in zip(ENTRIES, (_truncate, _flip_header_byte, _wrong_shape)):
        damaged[entry.line] = cache_path(cache, entry, settings)
        damage(damaged[entry.line])

    checked = cache_cli(cache, "verify")
    assert checked.exit_code == 1
    bad_lines = [line for line in checked.output.splitlines() if line.startswith("BAD ")]
    assert len(bad_lines) == 3 and f"{N} files checked: {N - 3} ok, 3 bad" in checked.output
    for path in damaged.values():
        assert sum(line.startswith(f"BAD {path}: ") for line in bad_lines) == 1, checked.output
    listed = cache_cli(cache, "ls").output.splitlines()
    assert any(line.startswith(damaged[1].name[:12]) and " BAD " in line for line in listed)

    stats, stderr = encode_json(cache, base["prompts"])
    assert (stats["hits"], stats["bad_cache_files"], stats["encoded"]) == (N - 3, 3, 3)
    for path in damaged.values():
        assert f"bad cache file, re-encoding: {path}" in stderr
    for entry in ENTRIES:
        tensors = load_record(cache, entry, settings).tensors
        assert all(torch.equal(tensors[name], originals[entry.line][name]) for name in TENSOR_NAMES)
    assert cache_cli(cache, "verify").exit_code == 0

    _truncate(damaged[1])
    deleted = cache_cli(cache, "verify", "--delete-bad")
    assert deleted.exit_code == 1 and "1 bad, 1 deleted" in deleted.output
    assert not damaged[1].exists() and damaged[2].exists()
    assert cache_cli(cache, "verify").exit_code == 0


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


def test_cache_ls_and_verify_on_a_good_cache(base: dict) -> None:
    settings = settings_for(base["cache"])
    keys = {embedding_key(entry.texts(), settings): entry for entry in ENTRIES}
    listed = cache_cli(base["cache"], "ls")
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert len(lines) == N
    for key, entry in keys.items():
        line = next(line for line in lines if line.startswith(key[:12]))
        assert " fp32 " in line and "clip_skip=-" in line and " BAD " not in line
        assert ("truncated" in line) == (entry.line == 5)
        assert json.dumps(entry.prompt[:20])[:-1] in line
        assert (f'negative="{entry.negative_prompt}"' in line) == (entry.negative_prompt is not None)
    as_json = json.loads(cache_cli(base["cache"], "ls", "--json").stdout)
    assert {e["key"]: e["texts"] for e in as_json["entries"]} == {k: e.texts() for k, e in keys.items()}
    checked = cache_cli(base["cache"], "verify")
    assert checked.exit_code == 0 and f"{N} files checked: {N} ok, 0 bad" in checked.output


def test_cache_gc_removes_by_age(base: dict, tmp_path: Path) -> None:
    cache = fork_cache(base["cache"], tmp_path / "cache")
    files = sorted((cache / "embeddings").glob("??/*.safetensors"))
    assert len(files) == N
    assert "freed 0 files" in cache_cli(cache, "gc", "--older-than", "1h").output
    old = files[0]
    old_bytes = old.stat().st_size
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))

    dry = cache_cli(cache, "gc", "--older-than", "0s", "--dry-run")
    assert f"would free {N} files" in dry.output and all(f.exists() for f in files)
    one = cache_cli(cache, "gc", "--older-than", "1d")
    assert "freed 1 files" in one.output and f"({old_bytes} bytes)" in one.output
    assert not old.exists() and all(f.exists() for f in files[1:])
    rest_bytes = sum(f.stat().st_size for f in files[1:])
    rest = cache_cli(cache, "gc", "--older-than", "0s")
    assert f"freed {N - 1} files" in rest.output and f"({rest_bytes} bytes)" in rest.output
    assert not list((cache / "embeddings").glob("??/*.safetensors"))


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("45m", 2700),
                                               ("3600s", 3600), ("2w", 14 * 86400), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert Duration().convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["30", "3x", "d", "-1d", "1 day", ""])
def test_bad_duration_is_one_line(text: str, tmp_path: Path) -> None:
    with pytest.raises(DurationError):
        Duration().convert(text, None, None)
    result = CliRunner().invoke(cli_group, ["--cache-dir", str(tmp_path), "cache", "gc", "--older-than", text])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: --older-than {text!r} is not a duration; use a number "
                                                  "and a unit: 30d, 12h, 45m, 3600s or 2w"]
