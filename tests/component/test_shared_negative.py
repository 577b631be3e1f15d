"""A negative prompt shared by many prompts is encoded once, and every prompt's tensors stay bit-identical to
diffusers' own encode_prompt."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_split.encoder_service.text_side import TextSide
from sdxl_split.shared.embeddings import TENSOR_NAMES
from sdxl_split.shared.models.resolve import resolve_model
from sdxl_split.shared.prompts import PromptEntry

SHARED = "blurry, low quality, watermark"
ENTRIES = [PromptEntry(line=n, prompt=f"a photo of thing number {n}", negative_prompt=SHARED) for n in range(1, 6)]
ENTRIES += [PromptEntry(line=6, prompt="a red house", negative_prompt="people"),
            PromptEntry(line=7, prompt="a blue house", negative_prompt="people", negative_prompt_2="cars"),
            PromptEntry(line=8, prompt="a green house")]


def test_a_shared_negative_is_encoded_once_and_tensors_stay_exact(tiny_dir: Path) -> None:
    side = TextSide(resolve_model(str(tiny_dir), tiny_dir.parent.parent), "cpu", "fp32")
    calls = {"clip_l": 0}
    forward = side.pipe.text_encoder.forward

    def counted(*args, **kwargs):
        calls["clip_l"] += 1
        return forward(*args, **kwargs)

    side.pipe.text_encoder.forward = counted
    ours = [side.encode([entry], clip_skip=None)[0].tensors for entry in ENTRIES]
    # 8 positives, and 3 distinct negatives (SHARED, "people", "people"+"cars" for CLIP-L's partner: CLIP-L
    # itself sees "people" twice, but the pair differs) instead of one negative pass per prompt.
    assert calls["clip_l"] == 8 + 3

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    for entry, tensors in zip(ENTRIES, ours):
        with torch.inference_mode():
            expected = reference.encode_prompt(
                prompt=entry.prompt, negative_prompt=entry.negative_prompt, negative_prompt_2=entry.negative_prompt_2,
                device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
        for name, tensor in zip(TENSOR_NAMES, expected):
            assert torch.equal(tensors[name], tensor), f"line {entry.line}: {name} differs from encode_prompt"
