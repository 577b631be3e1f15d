"""The prompt compiler on the tiny model: exact where nothing is to compile, chunked and weighted where it is, and
the denoiser renders compiled tensors exactly as diffusers renders the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.denoise import generators
from sdxl_split.denoiser_service.pipeline import build_denoiser
from sdxl_split.encoder_service import comfy_syntax
from sdxl_split.encoder_service.prompt_chunks import CHUNK_TOKENS, Chunker
from sdxl_split.encoder_service.prompt_explain import as_text, explain
from sdxl_split.encoder_service.prompt_syntax import parse
from sdxl_split.encoder_service.text_side import TextSide
from sdxl_split.shared.embeddings import TENSOR_NAMES, Embeddings
from sdxl_split.shared.encoding_settings import encoding_settings, entry_key
from sdxl_split.shared.memory import MemoryMeter
from sdxl_split.shared.models.resolve import resolve_model
from sdxl_split.shared.prompts import PromptEntry

WIDTH = 96  # the tiny model's 32 + 64


@pytest.fixture(scope="module")
def side(session_cache: Path) -> TextSide:
    return TextSide(resolve_model("tiny", session_cache), "cpu", "fp32")


SINGLE_TOKENS = "cat dog red blue green tree house car sun sky".split()  # one CLIP token each


def words(count: int) -> str:
    return " ".join(SINGLE_TOKENS[n % 10] for n in range(count))


@pytest.mark.parametrize("syntax", ["a1111", "comfy"])
@pytest.mark.parametrize("entry", [
    PromptEntry(line=1, prompt="a photo of a cat on a sofa, studio light"),
    PromptEntry(line=2, prompt="a red house", negative_prompt="blurry, low quality", negative_prompt_2="ugly"),
    PromptEntry(line=3, prompt="a tree", prompt_2="watercolor"),
])
def test_no_syntax_and_short_compiles_bit_identical_to_plain(side: TextSide, syntax: str, entry) -> None:
    plain = side.encode([entry], clip_skip=None)[0].tensors
    compiled = side.encode_compiled(entry, clip_skip=None, syntax=syntax).tensors
    for name in TENSOR_NAMES:
        assert torch.equal(compiled[name], plain[name]), f"{name} differs from encode_prompt"


def test_an_explicit_weight_of_one_is_the_plain_word(side: TextSide) -> None:
    weighted = side.encode_compiled(PromptEntry(line=1, prompt="(word:1.0) and more"), None, "a1111").tensors
    plain = side.encode_compiled(PromptEntry(line=1, prompt="word and more"), None, "a1111").tensors
    assert all(torch.equal(weighted[name], plain[name]) for name in TENSOR_NAMES)


@pytest.mark.parametrize("syntax", ["a1111", "comfy"])
def test_weights_change_only_what_they_weigh_and_differ_by_syntax(side: TextSide, syntax: str) -> None:
    base = side.encode_compiled(PromptEntry(line=1, prompt="a cat on a sofa"), None, syntax).tensors
    heavy = side.encode_compiled(PromptEntry(line=1, prompt="a (cat:1.5) on a sofa"), None, syntax).tensors
    assert not torch.equal(heavy["prompt_embeds"], base["prompt_embeds"])
    assert torch.equal(heavy["pooled_prompt_embeds"], base["pooled_prompt_embeds"]), "weights leave pooled alone"
    if syntax == "a1111":  # "Original" emphasis: each chunk keeps its mean per encoder
        for encoder in (slice(0, 32), slice(32, 96)):
            assert float(heavy["prompt_embeds"][..., encoder].mean()) == pytest.approx(
                float(base["prompt_embeds"][..., encoder].mean()), rel=1e-5)


def test_a_150_token_prompt_is_two_chunks_and_short_breaks_still_split(side: TextSide) -> None:
    long = side.encode_compiled(PromptEntry(line=1, prompt=words(150)), None, "a1111").tensors
    assert long["prompt_embeds"].shape == (1, 154, WIDTH) and long["pooled_prompt_embeds"].shape == (1, 64)
    assert long["negative_prompt_embeds"].shape == (1, 154, WIDTH)  # zeros, as long as the positive
    split = side.encode_compiled(PromptEntry(line=1, prompt="A BREAK B"), None, "a1111").tensors
    assert split["prompt_embeds"].shape == (1, 154, WIDTH)


def test_a_shorter_negative_is_padded_with_the_empty_prompt(side: TextSide) -> None:
    entry = PromptEntry(line=1, prompt=words(100), negative_prompt="blurry")
    tensors = side.encode_compiled(entry, None, "a1111").tensors
    assert tensors["negative_prompt_embeds"].shape == (1, 154, WIDTH)
    empty = side.encode_compiled(PromptEntry(line=1, prompt="", negative_prompt=""), None, "a1111").tensors
    assert torch.equal(tensors["negative_prompt_embeds"][:, 77:], empty["prompt_embeds"])


def test_chunks_move_back_to_a_comma_in_their_last_20_tokens(side: TextSide) -> None:
    chunker = Chunker(side.pipe.tokenizer)
    # 70 tokens, a comma, then 10 more: the chunk fills at 75, moves back past the comma at 70.
    chunks = chunker.chunks(parse(f"{words(70)}, {words(10)}"))
    assert [c.content for c in chunks] == [71, 10] and chunks[0].ended_by == "comma" and chunks[0].moved == 4
    # A comma 30 tokens back is too far: the chunk just fills up.
    chunks = chunker.chunks(parse(f"{words(45)}, {words(40)}"))
    assert [c.content for c in chunks] == [CHUNK_TOKENS, 11] and chunks[0].ended_by == "full"
    assert all(len(c.ids) == 77 == len(c.weights) for c in chunks)


def test_comfy_keeps_a_short_piece_whole_and_cuts_a_long_one(side: TextSide) -> None:
    """ComfyUI lays chunks out by piece: one of fewer than 8 tokens that does not fit moves whole to the next
    chunk; a longer one is cut at the chunk's end; no comma moves anything."""
    chunker = Chunker(side.pipe.tokenizer)
    chunks = chunker.comfy_chunks(comfy_syntax.parse(f"{words(72)}, ({words(5)}:1.2)"))
    assert [c.content for c in chunks] == [73, 5] and chunks[0].ended_by == "moved"
    chunks = chunker.comfy_chunks(comfy_syntax.parse(f"{words(72)}, ({words(10)}:1.2)"))
    assert [c.content for c in chunks] == [CHUNK_TOKENS, 8] and chunks[0].ended_by == "full"
    assert all(len(c.ids) == 77 == len(c.weights) for c in chunks)
    # The same text under a1111 moves back to the comma instead.
    assert [c.content for c in chunker.chunks(parse(f"{words(72)}, ({words(10)}:1.2)"))] == [73, 10]


def test_comfy_and_a1111_read_nested_weights_differently(side: TextSide) -> None:
    entry = PromptEntry(line=1, prompt="a ((cat:1.5)) on a sofa")
    comfy = side.encode_compiled(entry, None, "comfy").tensors
    absolute = side.encode_compiled(PromptEntry(line=1, prompt="a (cat:1.5) on a sofa"), None, "comfy").tensors
    assert torch.equal(comfy["prompt_embeds"], absolute["prompt_embeds"]), "ComfyUI: an explicit weight is absolute"
    a1111 = side.encode_compiled(entry, None, "a1111").tensors
    assert not torch.equal(a1111["prompt_embeds"], side.encode_compiled(
        PromptEntry(line=1, prompt="a (cat:1.5) on a sofa"), None, "a1111").tensors["prompt_embeds"])


def test_explain_shows_pieces_chunks_and_why_they_ended(side: TextSide) -> None:
    shown = explain("portrait, (freckles:1.3), [blurry] BREAK city", "a1111", side.pipe.tokenizer)
    assert shown["pieces"][1] == {"text": "freckles", "weight": 1.3} and {"break": True} in shown["pieces"]
    assert [c["ended_by"] for c in shown["chunks"]] == ["BREAK", "end"]
    assert "freckles</w>" in shown["chunks"][0]["tokens"] and 1.3 in shown["chunks"][0]["weights"]
    json.dumps(shown)
    text = as_text(shown).splitlines()
    assert text[1] == "pieces:" and "freckles(1.3)" in "\n".join(text)
    assert text.index("pieces:") < next(n for n, line in enumerate(text) if line.startswith("chunk 0"))
    plain = explain("a (cat:1.5) BREAK dog", "plain", side.pipe.tokenizer)
    assert len(plain["chunks"]) == 1 and any("plain reads brackets" in note for note in plain["notes"])
    one = as_text(explain("cat BREAK", "a1111", side.pipe.tokenizer))
    assert "chunk 0: 1 token, ended by" in one  # counts read as words: "1 token", not "1 tokens"


def test_compel_tensors_are_compels_own(side: TextSide) -> None:
    compel = pytest.importorskip("compel")
    entry = PromptEntry(line=1, prompt="a cat++ on a (sofa)0.8", negative_prompt="blurry")
    ours = side.encode_compiled(entry, None, "compel").tensors
    direct = compel.CompelForSDXL(side.pipe, device="cpu")(entry.prompt, negative_prompt=entry.negative_prompt)
    pairs = zip(TENSOR_NAMES, (direct.embeds, direct.negative_embeds, direct.pooled_embeds,
                               direct.negative_pooled_embeds))
    assert all(torch.equal(ours[name], theirs) for name, theirs in pairs)


def test_syntax_and_compiler_are_in_the_cache_key(session_cache: Path) -> None:
    settings = encoding_settings(resolve_model("tiny", session_cache), session_cache, "fp32", None)
    entry = PromptEntry(line=1, prompt="a (cat)")
    keys = {entry_key(entry, settings), entry_key(PromptEntry(line=1, prompt="a (cat)", syntax="a1111"), settings),
            entry_key(PromptEntry(line=1, prompt="a (cat)", syntax="comfy"), settings)}
    assert len(keys) == 3
    assert settings.for_entry(PromptEntry(line=1, prompt="x", syntax="a1111")).compiler == "a1111-2"


def test_compiled_tensors_render_exactly_as_diffusers_renders_them(side: TextSide, session_cache: Path,
                                                                   tiny_dir: Path) -> None:
    entry = PromptEntry(line=1, prompt=f"a (red:1.4) bicycle BREAK {words(80)}", negative_prompt="[blurry]")
    tensors = side.encode_compiled(entry, None, "a1111").tensors
    settings = encoding_settings(resolve_model("tiny", session_cache), session_cache, "fp32", None)
    record = Embeddings(key=entry_key(entry, settings.for_entry(entry)), texts=entry.texts(),
                        settings=settings.for_entry(entry), tensors=tensors)
    config = RenderConfig(width=64, height=64, steps=3)
    ours = build_denoiser(resolve_model("tiny", session_cache), config, MemoryMeter())
    image = np.array(ours.render(record, seed=5, count=1).images[0])
    ours.meter.close()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(**{name: tensors[name] for name in TENSOR_NAMES}, num_inference_steps=3, height=64, width=64,
                  generator=generators(5, 1)).images[0]
    assert np.array_equal(image, np.array(theirs)), "the denoiser must not alter compiled tensors"


def test_a_clip_skip_deeper_than_the_text_encoders_is_one_line_in_every_syntax(side: TextSide) -> None:
    """The tiny model has 4 text layers: diffusers would index past its hidden states (an IndexError)."""
    from sdxl_split.shared.errors import UserError

    assert side.max_clip_skip == 3
    entry = PromptEntry(line=1, prompt="a fox")
    with pytest.raises(UserError, match="at most 3 can be skipped"):
        side.encode([entry], clip_skip=4)
    with pytest.raises(UserError, match="at most 3 can be skipped"):
        side.encode_compiled(entry, 4, "a1111")
    assert side.encode([entry], clip_skip=3)[0].tensors["prompt_embeds"].shape[1] == 77
