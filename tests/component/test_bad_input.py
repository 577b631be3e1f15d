"""Bad input and broken stages found by trying sdxl-split as a new user: each is one clear line, named at the stage
that failed, before anything loads where possible, and loses nothing."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.pipeline import build_denoiser
from sdxl_split.denoiser_service.service import job_reply
from sdxl_split.denoiser_service.spec import DenoiserSpec, model_identity
from sdxl_split.shared import protocol as p
from sdxl_split.shared.embedding_cache import EmbeddingCache
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import embedding_key, encoding_settings
from sdxl_split.shared.errors import JobError
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.resolve import ModelSource, resolve_model
from sdxl_split.shared.prompts import PromptEntry, parse_prompt_file

RENDER = ["--size", "64x64", "--steps", "2"]


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--size", "99992x99992"], "over 4096 pixels"),
    (["--size", "2048x2048", "--images-per-prompt", "8"], "M pixels"),
    (["--guidance", "1e30"], "must be from 0 to 100"),
    (["--guidance", "nan"], "must be from 0 to 100"),
    (["--seed", "9223372036854775807", "--images-per-prompt", "2"], "would go past"),
])
def test_numbers_out_of_range_are_refused_before_anything_loads(cli, tmp_path: Path, flags, words: str) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    line = one_line(cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                        *flags))
    assert words in line and not (tmp_path / "o").exists()


def test_a_jsonl_seed_that_overflows_with_its_count_names_its_line(cli, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "seed": 9223372036854775807, "count": 2}\n')
    assert "p.jsonl:2:" in one_line(cli("--model", "tiny", "encode", str(prompts)))


def test_a_txt_file_of_jsonl_records_is_read_as_text_with_a_warning(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text('{"prompt": "a cat", "seed": 3}\nplain prompt\n{"prompt": "b"}\n')
    parsed = parse_prompt_file(prompts)
    assert parsed.entries[0].prompt == '{"prompt": "a cat", "seed": 3}'
    assert len(parsed.warnings) == 1 and "p.txt:1: 2 lines look like JSONL" in parsed.warnings[0]
    assert ".jsonl" in parsed.warnings[0]


def test_nan_latents_are_blamed_on_the_unet_not_the_vae(session_cache: Path, monkeypatch) -> None:
    source = resolve_model("tiny", session_cache)
    config = RenderConfig(width=64, height=64, steps=2, guidance=7.0)
    denoiser = build_denoiser(source, config, MemoryMeter())
    decoded = []
    monkeypatch.setattr(denoiser, "decode", lambda latents: decoded.append(latents))

    class NanLatents:
        images = torch.full((1, 4, 8, 8), float("nan"))

    monkeypatch.setattr(denoiser, "pipe", type("P", (), {"__call__": lambda self, **kw: NanLatents(),
                                                          "vae": denoiser.pipe.vae,
                                                          "scheduler": denoiser.pipe.scheduler})())
    record = _record(session_cache, "a cat")
    with pytest.raises(JobError, match="UNet produced NaN/Inf latents"):
        denoiser.render(record, seed=0, count=1)
    assert decoded == [], "the VAE must not run on NaN latents"
    denoiser.meter.close()


def _record(cache_dir: Path, prompt: str, widths: tuple[int, int] = (96, 64)) -> Embeddings:
    source = resolve_model("tiny", cache_dir)
    settings = encoding_settings(source, cache_dir, "fp32", None)
    entry = PromptEntry(line=1, prompt=prompt)
    tensors = {"prompt_embeds": torch.randn(1, 77, widths[0]), "negative_prompt_embeds": torch.zeros(1, 77, widths[0]),
               "pooled_prompt_embeds": torch.randn(1, widths[1]),
               "negative_pooled_prompt_embeds": torch.zeros(1, widths[1])}
    return Embeddings(key=embedding_key(entry.texts(), settings), texts=entry.texts(), settings=settings,
                      tensors=tensors)


def test_a_wrong_width_cache_file_is_reencoded_and_found_by_verify_with_a_model(cli, cache_dir: Path,
                                                                                tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    wrong = _record(cache_dir, "a cat", widths=(100, 64))  # this model's key, another model's widths
    EmbeddingCache(cache_dir / "embeddings").store(wrong)
    verified = cli("cache", "verify")
    assert verified.returncode == 0, "without --model the file is a valid record"
    checked = cli("--model", "tiny", "cache", "verify")
    assert checked.returncode == 1 and "100/64-wide embeddings" in checked.stdout and "96/64" in checked.stdout
    encoded = cli("--model", "tiny", "encode", str(prompts), "--json")
    assert encoded.returncode == 0 and json.loads(encoded.stdout)["stats"]["bad_cache_files"] == 1
    rendered = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"), *RENDER)
    assert rendered.returncode == 0, rendered.stderr


def test_a_full_disk_keeps_the_job_pending_and_names_the_path(session_cache: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    from sdxl_split.denoiser_service import outputs

    source = resolve_model("tiny", session_cache)
    config = RenderConfig(out_dir=tmp_path / "out", width=64, height=64, steps=2)
    spec = DenoiserSpec(source=source, identity=model_identity(source, session_cache), config=config,
                        cache_dir=session_cache)
    record = _record(session_cache, "a cat")

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "atomic_write_bytes", full)
    from sdxl_split.denoiser_service.outputs import OutputDir
    from sdxl_split.denoiser_service.renderer import Renderer

    meter = MemoryMeter()
    renderer = Renderer(lambda: build_denoiser(source, config, meter),
                        OutputDir(config.out_dir))
    job = p.Job.build("a" * 64, 1, PromptEntry(line=1, prompt="a cat"), record)
    reply = job_reply(renderer, spec, job)
    meter.close()
    assert isinstance(reply, p.Error) and reply.scope == "denoiser"
    assert "No space left on device writing " + str(tmp_path / "out") in reply.reason
    assert "stays pending" in reply.reason


def test_a_full_cache_disk_is_one_line_naming_the_file(cli, tmp_path: Path, monkeypatch) -> None:
    from sdxl_split.shared import atomic

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_atomic_write", full)
    result = cli("--model", "tiny", "encode", str(prompts))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: No space left on device: ")
    assert "embeddings" in lines[-1] and "re-run the same command" in lines[-1]


def test_pngs_name_the_model_without_local_paths_unless_asked(cli, cache_dir: Path, tmp_path: Path) -> None:
    from sdxl_split.denoiser_service.outputs import read_png_metadata

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    folder = str(cache_dir / "models" / "tiny")
    assert cli("--model", folder, "encode", str(prompts)).returncode == 0
    for mode, out in (("a1111", tmp_path / "short"), ("full", tmp_path / "full")):
        rendered = cli("--model", folder, "render", "--prompts", str(prompts), "--out", str(out), *RENDER,
                       "--metadata", mode)
        assert rendered.returncode == 0, rendered.stderr
        parameters, config = read_png_metadata(next(out.glob("*.png")))
        assert "Model: tiny" in parameters and folder not in parameters
        assert (folder in json.dumps(config)) is (mode == "full")


def test_a_single_file_checkpoint_is_named_by_its_stem_and_autov2_hash(tmp_path: Path) -> None:
    checkpoint = tmp_path / "dreamshaperXL_v21.safetensors"
    checkpoint.write_bytes(save({"w": torch.zeros(4)}))
    source = ModelSource(spec=str(checkpoint), kind="single_file", location=str(checkpoint),
                         config_dir=tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    identity = model_identity(source, tmp_path / "cache")
    assert identity.name == "dreamshaperXL_v21"
    assert identity.hash == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]


def test_an_offline_tiny_vae_miss_says_what_it_means(cli, cache_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "my-sdxl"
    shutil.copytree(cache_dir / "models" / "tiny", model)
    shutil.rmtree(model / "vae_tiny")  # like a real SDXL folder: no tiny VAE beside it
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert cli("--model", str(model), "encode", str(prompts)).returncode == 0
    result = cli("--model", str(model), "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--vae", "tiny", *RENDER)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(lines) == 1
    assert "neither on disk" in lines[0] and "--vae-model" in lines[0] and "config.json" not in lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--engine", "ray", "--credits", "4"], "--credits only applies to --engine zmq"),
    (["--encoders", "2"], "--encoders only applies to --engine ray"),
    (["--ray-address", "auto", "--job-timeout", "60"], "--ray-address only applies to --engine ray"),
])
def test_an_option_of_the_other_engine_is_refused(cli, tmp_path: Path, flags, words: str) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    result = cli("--model", "tiny", "run", str(prompts), *flags)
    assert result.returncode == 2 and words in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["run"], ["encode"], ["render", "--prompts"]])
def test_a_prompt_over_eight_chunks_is_refused_before_any_work(cli, tmp_path: Path, command: list[str]) -> None:
    """40 BREAKs compile to 41 chunks; a record holds 8. The whole-file check says so, naming the line, before
    anything starts (it used to be skipped, with exit 0 and "0 rendered")."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + json.dumps({"prompt": " BREAK ".join(["a cat"] * 41),
                                                              "syntax": "a1111"}) + "\n")
    render = ["--out", str(tmp_path / "o"), "--size", "64x64"] if command[0] != "encode" else []
    result = cli("--model", "tiny", *command, str(prompts), *render)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[-1] == (f"error: {prompts}:2: prompt compiles to 41 chunks of 75 tokens under --prompt-syntax "
                         "a1111; at most 8 fit: shorten it or use fewer BREAKs")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))
