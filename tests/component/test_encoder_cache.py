"""Component layer: the embedding cache that `encode` fills: bad files found and re-encoded, ls, verify and gc."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli
from encoder_kit import (
    ENTRIES,
    N,
    cache_cli,
    cache_path,
    encode_json,
    filled_cache,
    fork_cache,
    header_metadata,
    load_record,
    settings_for,
)
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl_split.cli.cache_cmd import Duration, DurationError
from sdxl_split.shared.embeddings import TENSOR_NAMES
from sdxl_split.shared.encoding_settings import embedding_key


@pytest.fixture(scope="module")
def base(tmp_path_factory, session_cache: Path) -> dict:
    return filled_cache(tmp_path_factory, session_cache)


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


def test_cache_ls_and_verify_on_a_good_cache(base: dict) -> None:
    settings = settings_for(base["cache"])
    keys = {embedding_key(entry.texts(), settings): entry for entry in ENTRIES}
    listed = cache_cli(base["cache"], "ls")
    assert listed.exit_code == 0
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["KEY", "DTYPE", "CLIP", "SKIP", "TEXT", "SIZE", "AGE", "PROMPT"]
    assert len(lines) == N
    for key, entry in keys.items():
        line = next(line for line in lines if line.startswith(key[:12]))
        assert line.split()[1:3] == ["fp32", "-"] and " BAD " not in line
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
    assert "freed 1 file," in one.output and f"({old_bytes} bytes)" in one.output
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
    result = invoke_cli("cache", "gc", "--older-than", text, cache=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --older-than {text!r} is not a duration; use a number "
                                                  "and a unit: 30d, 12h, 45m, 3600s or 2w"]
