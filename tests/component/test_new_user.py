"""What a new user meets first (Hardening 2, item 9): prompts without a file, warnings for weights plain ignores,
model load apart from per-image time, bad options refused before any process starts, random seeds, and words
that read right."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from sdxl_split.denoiser_service.outputs import read_png_metadata

RENDER = ["--size", "64x64", "--steps", "2"]


def manifest_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_prompts_come_from_prompt_flags_or_stdin_without_a_file(cli, tmp_path: Path) -> None:
    encoded = cli("--model", "tiny", "encode", "--prompt", "a red fox", "--prompt", "a blue heron")
    assert encoded.returncode == 0, encoded.stderr
    assert "2 prompts (2 unique)" in encoded.stdout
    # The "render them later" command it prints gives the same prompts back.
    assert "render --prompt 'a red fox' --prompt 'a blue heron'" in encoded.stdout
    out = tmp_path / "out"
    rendered = cli("--model", "tiny", "render", "--prompt", "a red fox", "--prompt", "a blue heron", "--out",
                   str(out), *RENDER)
    assert rendered.returncode == 0, rendered.stderr
    assert sorted(row["prompt"] for row in manifest_rows(out)) == ["a blue heron", "a red fox"]
    piped = cli("--model", "tiny", "render", "--prompts", "-", "--out", str(out), *RENDER,
                stdin=b"a red fox\n# a comment\na blue heron\n")
    assert piped.returncode == 0 and "0 images rendered, 2 already there" in piped.stdout, piped.stderr


def test_no_prompts_at_all_is_one_line(cli) -> None:
    result = cli("--model", "tiny", "encode")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: no prompts: give a prompt file (or - to read one from stdin), or "
                                     "--prompt TEXT")


def test_weights_in_a_plain_prompt_are_warned_once_and_the_png_says_how_it_was_read(cli, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a (red:1.4) fox\na ((blue)) heron\na grey cat\n")
    out = tmp_path / "out"
    assert cli("--model", "tiny", "encode", str(prompts)).returncode == 0
    rendered = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER)
    warnings = [line for line in rendered.stderr.splitlines() if "read as words" in line]
    assert warnings == [f"warning: {prompts}:1 (and 1 other line): A1111 weights like (word:1.2) are read as words "
                        "under --prompt-syntax plain; add --prompt-syntax a1111 to apply them"]
    parameters = {row["prompt"]: read_png_metadata(out / row["file"])[0] for row in manifest_rows(out)}
    assert parameters["a (red:1.4) fox"].endswith(", Prompt syntax: plain")
    assert "Prompt syntax" not in parameters["a grey cat"]


def test_render_reports_the_model_load_apart_from_the_time_per_image(cli, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    assert cli("--model", "tiny", "encode", str(prompts)).returncode == 0
    # A load made 3 s slower (weights on a slow disk) shows in the load's own figure. That the per-image time
    # holds renders alone is exact in tests/unit/test_renderer_timing.py; here, on a busy box, it would be a race.
    rendered = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"), *RENDER,
                   "--fault", "load_delay_s=3")
    assert rendered.returncode == 0, rendered.stderr
    [line] = [line for line in rendered.stdout.splitlines() if line.startswith("model load ")]
    assert re.fullmatch(r"model load \d+\.\d s; \d+\.\d\d s/image after it", line), line
    assert float(line.split()[2]) >= 3.0
    assert "1 image rendered, 0 already there, 0 jobs failed, 0 prompts missing" in rendered.stdout


def test_run_refuses_a_bad_size_before_starting_any_process(cli, tmp_path: Path, monkeypatch) -> None:
    import sdxl_split.shared.supervisor as supervisor

    def no_children(*args, **kwargs):
        raise AssertionError("run started a child process before checking --size")

    monkeypatch.setattr(supervisor, "spawn_child", no_children)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    result = cli("--model", "tiny", "run", str(prompts), "--size", "100x100", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: image width 100 must be a positive multiple of 8 (the "
                                                      "VAE works in 8x8 blocks)")


@pytest.mark.parametrize("how", ["flag", "jsonl"])
def test_seed_minus_one_draws_a_random_seed_reported_in_the_png_and_manifest(cli, tmp_path: Path, how: str) -> None:
    if how == "flag":
        prompts, flags = tmp_path / "p.txt", ["--seed", "-1"]
        prompts.write_text("a red fox\na blue heron\n")
    else:
        prompts, flags = tmp_path / "p.jsonl", []
        prompts.write_text('{"prompt": "a red fox", "seed": -1}\n{"prompt": "a blue heron", "seed": -1}\n')
    out = tmp_path / "out"
    assert cli("--model", "tiny", "encode", str(prompts)).returncode == 0
    rendered = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER, *flags)
    assert rendered.returncode == 0, rendered.stderr
    rows = manifest_rows(out)
    seeds = {row["seed"] for row in rows}
    assert len(seeds) == 2 and all(0 <= seed < 2**32 for seed in seeds), seeds
    for row in rows:
        assert f"Seed: {row['seed']}," in read_png_metadata(out / row["file"])[0]
        assert (row["steps"], row["width"], row["height"]) == (2, 64, 64)
        assert Image.open(out / row["file"]).size == (64, 64)
