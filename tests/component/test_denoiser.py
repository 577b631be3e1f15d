"""The denoiser: pixels bit-identical to the diffusers monolith, options, metadata, resume and bad combinations."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, hang_bound, run_cli
from diffusers import AutoencoderTiny, StableDiffusionXLPipeline
from PIL import Image

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.outputs import read_png_metadata
from sdxl_split.denoiser_service.pipeline import build_denoiser
from sdxl_split.encoder_service.text_side import TextSide
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.resolve import resolve_model
from sdxl_split.shared.prompts import PromptEntry

PROMPTS = [
    {"prompt": "a photo of a cat", "seed": 3},
    {"prompt": "a lighthouse at dusk, oil painting", "negative_prompt": "blurry, low quality", "seed": 11},
    {"prompt": "a red bicycle", "prompt_2": "studio light", "negative_prompt": "people", "seed": 0},
]
RENDER = ["--size", "64x64", "--steps", "4", "--images-per-prompt", "2"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def monolith_images(tiny_dir: Path, row: dict, vae: str, count: int = 2) -> list[np.ndarray]:
    extra = {"vae": AutoencoderTiny.from_pretrained(tiny_dir / "vae_tiny")} if vae == "tiny" else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, **extra)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt=row["prompt"], prompt_2=row.get("prompt_2"), negative_prompt=row.get("negative_prompt"),
        num_images_per_prompt=count, num_inference_steps=4, height=64, width=64,
        generator=[torch.Generator("cpu").manual_seed(row["seed"] + i) for i in range(count)],
    ).images
    return [np.array(image) for image in images]


@pytest.mark.parametrize("vae", ["full", "tiny"])
def test_split_processes_match_monolith_bit_for_bit(cache_dir: Path, tiny_dir: Path, tmp_path: Path, vae: str) -> None:
    # Two real processes, as users run them: the contract is about splitting, so nothing may be shared.
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    encoded = run_cli("--model", "tiny", "encode", str(prompts), cache=cache_dir)
    assert encoded.returncode == 0, encoded.stderr
    out = tmp_path / "out"
    rendered = run_cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), "--vae", vae,
                       *RENDER, cache=cache_dir)
    assert rendered.returncode == 0, rendered.stderr
    records = manifest(out)
    assert len(records) == 2 * len(PROMPTS)
    for row in PROMPTS:
        expected = monolith_images(tiny_dir, row, vae)
        ours = sorted((r for r in records if r["prompt"] == row["prompt"]), key=lambda r: r["index"])
        for record, reference in zip(ours, expected, strict=True):
            pixels = np.array(Image.open(out / record["file"]))
            assert pixels.shape == reference.shape
            assert np.array_equal(pixels, reference), f"{row['prompt']} image {record['index']} differs"


def test_png_carries_a1111_parameters_and_config(cli, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[1:2])
    out = tmp_path / "out"
    assert cli("--model", "tiny", "encode", str(prompts)).returncode == 0
    assert cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER,
               "--guidance", "6.5").returncode == 0
    record = manifest(out)[0]
    parameters, config = read_png_metadata(out / record["file"])
    lines = parameters.splitlines()
    assert lines[0] == PROMPTS[1]["prompt"]
    assert lines[1] == "Negative prompt: blurry, low quality"
    assert "Steps: 4, Sampler: Euler, CFG scale: 6.5, Seed: 11" in lines[2] and "Size: 64x64" in lines[2]
    assert config["embedding_key"] == record["embedding_key"]
    assert config["config"]["steps"] == 4 and config["config"]["width"] == 64
    assert config["image_id"] == record["image_id"]


def test_denoiser_never_instantiates_a_text_encoder(cli, cache_dir: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    assert cli("--model", "tiny", "encode", str(prompts)).returncode == 0
    code = textwrap.dedent(f"""
        import transformers
        def refuse(self, *a, **k):
            raise SystemExit("text encoder instantiated in the denoiser")
        transformers.CLIPTextModel.__init__ = refuse
        transformers.CLIPTextModelWithProjection.__init__ = refuse
        transformers.CLIPTokenizer.__init__ = refuse
        from sdxl_split.cli.main import main
        main(["--model", "tiny", "render", "--prompts", {str(prompts)!r}, "--out", {str(tmp_path / "o")!r},
              "--size", "64x64", "--steps", "2"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=hang_bound(600),
                            env=cli_env(cache_dir))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def _render_pixels(cli, prompts: Path, out: Path, *flags: str) -> np.ndarray:
    result = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER, *flags)
    assert result.returncode == 0, result.stderr
    records = sorted(manifest(out), key=lambda r: (r["prompt"], r["index"]))
    return np.stack([np.array(Image.open(out / r["file"])) for r in records])


def test_classic_attention_and_vae_slicing_match_defaults(cli, tmp_path: Path) -> None:
    """Stated tolerance: at most 1 level in 255 per channel (float reassociation inside attention/decode)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    assert cli("--model", "tiny", "encode", str(prompts)).returncode == 0
    base = _render_pixels(cli, prompts, tmp_path / "base")
    classic = _render_pixels(cli, prompts, tmp_path / "classic", "--attention", "default")
    sliced = _render_pixels(cli, prompts, tmp_path / "sliced", "--vae-slicing")
    one_row_calls = _render_pixels(cli, prompts, tmp_path / "rows", "--unet-batch", "1")
    for other in (classic, sliced, one_row_calls):
        assert other.shape == base.shape
        assert np.abs(other.astype(int) - base.astype(int)).max() <= 1


def _bicycle_record(tiny_dir: Path):
    """The tiny model and one prompt's embeddings, encoded in process, for tests that load the denoiser here."""
    source = resolve_model(str(tiny_dir), tiny_dir.parent.parent)
    entry = PromptEntry(line=1, prompt="a red bicycle", negative_prompt="blurry")
    tensors = TextSide(source, "cpu", "fp32").encode([entry], clip_skip=None)[0].tensors
    return source, Embeddings(key="0" * 64, texts=entry.texts(), tensors=tensors,
                              settings=EncodingSettings(fingerprint="t", clip_skip=None, dtype="fp32",
                                                        force_zeros=True))


def _render_in_process(source, record, config: RenderConfig, count: int = 2, before=None) -> tuple[object, np.ndarray]:
    denoiser = build_denoiser(source, config, MemoryMeter())
    if before is not None:
        before(denoiser.pipe)
    images = denoiser.render(record, seed=5, count=count).images
    return denoiser.pipe, np.stack([np.array(image) for image in images]).astype(int)


def test_unet_batch_caps_the_rows_of_every_unet_call(tiny_dir: Path) -> None:
    source, record = _bicycle_record(tiny_dir)
    images = {}
    for rows in (None, 3):
        seen: list[int] = []

        def count_rows(pipe, seen=seen) -> None:
            pipe.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))

        _, images[rows] = _render_in_process(source, record, RenderConfig(width=64, height=64, steps=2,
                                                                          unet_batch=rows), 3, count_rows)
        # 3 images are 6 rows under guidance: one call of 6, or two of 3, per step.
        assert seen == ([6] if rows is None else [3, 3]) * 2, seen
    assert np.abs(images[3] - images[None]).max() <= 1
    assert "unet_batch" not in RenderConfig().pixel_settings()  # names from before the option stay the same
    assert RenderConfig(unet_batch=4).pixel_settings() != RenderConfig().pixel_settings()


def test_fused_qkv_renders_the_same_and_keeps_no_unfused_copies(tiny_dir: Path) -> None:
    source, record = _bicycle_record(tiny_dir)
    images, weights = {}, {}
    for fused in (False, True):
        pipe, images[fused] = _render_in_process(source, record, RenderConfig(width=64, height=64, steps=2,
                                                                              fuse_qkv=fused))
        weights[fused] = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae")}
    # One matmul for q, k and v holds exactly their weights: diffusers' copies of the separate ones are gone.
    assert weights[True] == weights[False]
    assert np.abs(images[True] - images[False]).max() <= 1


def test_int8_quantization_quantizes_the_image_token_linears_and_stays_close(tiny_dir: Path) -> None:
    source, record = _bicycle_record(tiny_dir)
    _, plain = _render_in_process(source, record, RenderConfig(width=64, height=64, steps=4))
    pipe, quantized = _render_in_process(source, record, RenderConfig(width=64, height=64, steps=4,
                                                                      quantize="int8"))
    kinds = {name: type(module.weight).__name__ for name, module in pipe.unet.named_modules()
             if isinstance(module, torch.nn.Linear)}
    assert kinds["up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"] == "Int8Tensor"
    assert kinds["up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == "Int8Tensor"
    # One row per image, or the 77 text tokens: quantizing those activations would cost more than it saves.
    assert kinds["time_embedding.linear_1"] == "Parameter"
    assert kinds["up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == "Parameter"
    diff = np.abs(quantized - plain)
    assert 0 < diff.mean() < 2 and diff.max() <= 16, (diff.mean(), diff.max())
    assert RenderConfig(quantize="int8").pixel_settings()["quantize"] == "int8"
    assert "quantize" not in RenderConfig().pixel_settings()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--offload", "model"], "needs --device cuda"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--size", "65x64"], "multiple of 8"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--vae-model", "x/y"], "--vae tiny"),
        (["--compile", "--compile-mode", "reduce-overhead"], "needs --device cuda"),
        (["--quantize", "fp8"], "fp8 tensor cores (Ada or Hopper); on the CPU use --quantize int8"),
    ],
)
def test_invalid_combinations_fail_in_one_line(cli, tmp_path: Path, flags: list[str], expected: str) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    result = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"), *flags)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("offload", ["model", "sequential", "group"])
def test_compile_with_offload_is_refused_before_loading(offload: str) -> None:
    from sdxl_split.denoiser_service.config import validate
    from sdxl_split.shared.errors import UserError

    with pytest.raises(UserError, match="cannot be combined"):
        validate(RenderConfig(device="cuda", dtype="fp16", compile=True, offload=offload), cuda_available=True)


def test_missing_embeddings_are_listed_with_the_encode_command(cli, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    result = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"), *RENDER)
    assert result.returncode == 3
    assert f"encode {prompts}" in result.stderr
    assert result.stderr.count("missing embeddings") == 2


def test_rendering_twice_writes_each_file_once(cli, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "out"
    assert cli("--model", "tiny", "encode", str(prompts)).returncode == 0
    first = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER, "--json")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    second = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER, "--json")
    assert json.loads(first.stdout)["stats"]["images"] == 4
    again = json.loads(second.stdout)["stats"]
    assert again["images"] == 0 and again["existing"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps
    assert len(manifest(out)) == 4


@pytest.mark.slow
def test_compile_runs_on_cpu_for_the_tiny_model(cli, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    assert cli("--model", "tiny", "encode", str(prompts)).returncode == 0
    result = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--size", "64x64", "--steps", "2", "--compile", timeout=900)
    assert result.returncode == 0, result.stderr
    assert "compiles" in result.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 1
