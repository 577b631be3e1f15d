"""Component layer: the tiny model is a real SDXL diffusers folder, built deterministically, with real tokenizers."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_split.shared.models.architectures import TINY
from sdxl_split.shared.models.builder import build_model
from sdxl_split.shared.models.clip_tokenizers import load_tokenizer


def test_tiny_model_builds_byte_identical_twice(tmp_path: Path) -> None:
    build_model(TINY, tmp_path / "a")
    build_model(TINY, tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and any(f.suffix == ".safetensors" for f in files_a)
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files_a, shallow=False)
    assert not mismatch and not errors


def test_tokenizers_are_real_clip_bpe(tiny_dir: Path) -> None:
    tok1 = load_tokenizer(tiny_dir / "tokenizer")
    tok2 = load_tokenizer(tiny_dir / "tokenizer_2")
    assert tok1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded1 = tok1("a cat", padding="max_length", max_length=77).input_ids
    padded2 = tok2("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded1) == 77 and padded1[-1] == 49407  # pads with <|endoftext|>
    assert len(padded2) == 77 and padded2[-1] == 0  # pads with "!"
    long_ids = tok1(" ".join(["cat"] * 100), truncation=True, max_length=tok1.model_max_length).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == 49407


def test_diffusers_loads_tiny_model_and_generates(tiny_dir: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0
