"""LoRAs and textual inversions across the split (tiny model): the text half in the encoder, the UNet half in the
denoiser, images bit-identical to diffusers' own pipeline with the same adapters, and cache keys that follow them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from sdxl_split.encoder_service.text_side import TextSide
from sdxl_split.shared.embeddings import TENSOR_NAMES
from sdxl_split.shared.encoding_settings import encoding_settings, entry_key
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.loras import parse_flag, strip_tags
from sdxl_split.shared.models.resolve import resolve_model
from sdxl_split.shared.models.test_assets import tiny_embedding, tiny_lora
from sdxl_split.shared.prompt_extras import ExtrasResolver
from sdxl_split.shared.prompts import PromptEntry

RENDER = ["--size", "64x64", "--steps", "3"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    (folder / "style.safetensors").write_bytes(tiny_lora("both", seed=1))
    (folder / "detail.safetensors").write_bytes(tiny_lora("both", seed=2))
    (folder / "unetonly.safetensors").write_bytes(tiny_lora("unet", seed=3))
    (folder / "textonly.safetensors").write_bytes(tiny_lora("text", seed=4))
    (folder / "sparkle.safetensors").write_bytes(tiny_embedding(seed=5))
    return folder


def monolith(tiny_dir: Path, assets: Path, prompt: str, negative: str | None, loras: list[tuple[str, float]],
             inversion: bool = False) -> np.ndarray:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in loras:
        pipe.load_lora_weights(str(assets / f"{name}.safetensors"), adapter_name=name)
    if loras:
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
    if inversion:
        vectors = load_file(str(assets / "sparkle.safetensors"))
        pipe.load_textual_inversion(vectors["clip_l"], token="sparkle", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vectors["clip_g"], token="sparkle", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    image = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=3, height=64, width=64,
                 generator=[torch.Generator("cpu").manual_seed(0)]).images[0]
    return np.array(image)


def split(cli, tmp_path: Path, assets: Path, rows: list[dict], *flags: str) -> list[np.ndarray]:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["--lora-dir", str(assets), "--embedding", str(assets / "sparkle.safetensors"), *flags]
    encoded = cli("--model", "tiny", "encode", str(prompts), *common)
    assert encoded.returncode == 0, encoded.stderr
    out = tmp_path / "out"
    rendered = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER, *common)
    assert rendered.returncode == 0, rendered.stderr
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"]: np.array(Image.open(out / r["file"])) for r in records}
    return [by_prompt[row["prompt"]] for row in rows]


@pytest.mark.parametrize("case", ["one", "two-scales", "unet-only", "text-only", "inversion"])
def test_split_images_equal_diffusers_with_the_same_adapters(cli, tmp_path: Path, tiny_dir: Path, assets: Path,
                                                             case: str) -> None:
    if case == "one":
        row, flags, loras = {"prompt": "a cat <lora:style:0.8>"}, [], [("style", 0.8)]
    elif case == "two-scales":
        row = {"prompt": "a cat", "loras": [{"name": "style", "scale": 0.5}, {"name": "detail", "scale": 1.3}]}
        flags, loras = [], [("style", 0.5), ("detail", 1.3)]
    elif case == "unet-only":
        row, flags, loras = {"prompt": "a cat"}, ["--lora", str(assets / "unetonly.safetensors") + ":0.9"], [
            ("unetonly", 0.9)]
    elif case == "text-only":
        row, flags, loras = {"prompt": "a cat <lora:textonly>"}, [], [("textonly", 1.0)]
    else:
        row, flags, loras = {"prompt": "a sparkle cat", "negative_prompt": "sparkle, blurry"}, [], []
    text = row["prompt"].split(" <lora")[0]
    expected = monolith(tiny_dir, assets, text, row.get("negative_prompt"), loras, inversion=case == "inversion")
    [ours] = split(cli, tmp_path, assets, [row], *flags)
    assert np.array_equal(ours, expected), f"{case}: split image differs from diffusers'"


def test_prompts_with_and_without_loras_in_one_run_get_their_own_tensors(session_cache: Path, assets: Path) -> None:
    source = resolve_model("tiny", session_cache)
    resolver = ExtrasResolver((), assets, (), None, session_cache)
    plain, styled = PromptEntry(line=1, prompt="a cat"), PromptEntry(line=2, prompt="a cat <lora:style:0.7>")
    side = TextSide(source, "cpu", "fp32")

    def encode(entry: PromptEntry) -> dict:
        extras = resolver.resolve(entry)
        side.use_loras(extras.text_loras)
        return side.encode([extras.entry], None)[0].tensors

    alternating = [encode(entry) for entry in (plain, styled, plain, styled)]
    alone = [encode(plain)]
    fresh = TextSide(source, "cpu", "fp32")
    extras = resolver.resolve(styled)
    fresh.use_loras(extras.text_loras)
    alone.append(fresh.encode([extras.entry], None)[0].tensors)
    for got, want in zip(alternating, [*alone, *alone]):
        assert all(torch.equal(got[n], want[n]) for n in TENSOR_NAMES)
    assert not torch.equal(alone[0]["prompt_embeds"], alone[1]["prompt_embeds"]), "the LoRA must change them"


def test_the_cache_key_follows_text_side_loras_and_nothing_else(session_cache: Path, assets: Path,
                                                                tmp_path: Path) -> None:
    settings = encoding_settings(resolve_model("tiny", session_cache), session_cache, "fp32", None)

    def key(prompt: str, folder: Path = assets) -> str:
        entry = PromptEntry(line=1, prompt=prompt)
        return entry_key(entry, settings, ExtrasResolver((), folder, (), None, session_cache).resolve(entry))

    base = key("a cat")
    assert key("a cat <lora:style:0.8>") != key("a cat <lora:style:0.9>") != base
    assert key("a cat <lora:unetonly:0.8>") != base  # the text differs (the tag), but...
    unet_only = ExtrasResolver((("unetonly", 0.8),), assets, (), None, session_cache)
    entry = PromptEntry(line=1, prompt="a cat")
    assert entry_key(entry, settings, unet_only.resolve(entry)) == base, "a UNet-only LoRA leaves the key alone"
    changed = tmp_path / "loras"
    changed.mkdir()
    (changed / "style.safetensors").write_bytes(tiny_lora("both", seed=99))  # same name, other bytes
    assert key("a cat <lora:style:0.8>", changed) != key("a cat <lora:style:0.8>")


def test_lora_tags_and_flags_parse_as_a1111_writes_them(session_cache: Path, assets: Path) -> None:
    assert strip_tags("a cat <lora:style:0.6>, <lora:detail>") == ("a cat , ", [("style", 0.6), ("detail", 1.0)])
    assert parse_flag("/x/y.safetensors:0.5") == ("/x/y.safetensors", 0.5)
    assert parse_flag("/x/y.safetensors") == ("/x/y.safetensors", 1.0)
    resolver = ExtrasResolver((), assets, (), None, session_cache)
    with pytest.raises(UserError, match=f"LoRA 'nosuch' not found: no such file in --lora-dir {assets}"):
        resolver.resolve(PromptEntry(line=3, prompt="a <lora:nosuch:1>"))
    with pytest.raises(UserError, match="scale 'lots' is not a number"):
        resolver.resolve(PromptEntry(line=3, prompt="a <lora:style:lots>"))


def test_a_missing_lora_is_one_line_before_anything_loads(cli, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat <lora:ghost:0.5>\n")
    result = cli("--model", "tiny", "encode", str(prompts), "--lora-dir", str(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "LoRA 'ghost' not found" in lines[0]


def test_fuse_lora_renders_its_set_and_refuses_jobs_that_need_another(cli, tmp_path: Path, assets: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog <lora:detail:0.5>\n")
    flags = ["--lora", "style:0.8", "--lora-dir", str(assets)]
    assert cli("--model", "tiny", "encode", str(prompts), *flags).returncode == 0
    result = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"), *RENDER,
                 *flags, "--fuse-lora")
    assert result.returncode == 3, result.stderr
    assert "has LoRAs fused (--fuse-lora: style:0.8)" in result.stderr
    assert "needs style:0.8, detail:0.5" in result.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_fuse_lora_with_fused_qkv_reaches_the_fused_projections(cli, tmp_path: Path, tiny_dir: Path,
                                                               assets: Path) -> None:
    """The LoRA is fused into q, k and v before they are concatenated; fused after, it would miss them."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    flags = ["--lora", "style:0.8", "--lora-dir", str(assets)]
    assert cli("--model", "tiny", "encode", str(prompts), *flags).returncode == 0
    out = tmp_path / "o"
    result = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER, *flags,
                 "--fuse-lora", "--fuse-qkv")
    assert result.returncode == 0, result.stderr
    [png] = out.glob("*.png")
    fused = np.array(Image.open(png))
    expected = monolith(tiny_dir, assets, "a cat", None, [("style", 0.8)], inversion=False)
    without_lora = monolith(tiny_dir, assets, "a cat", None, [], inversion=False)
    # Fused weights and one matmul for q/k/v reassociate float sums: a level in 255 at most.
    assert np.abs(fused.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(fused.astype(int) - without_lora.astype(int)).max() > 1, "the LoRA must change the image"


def test_a_per_job_lora_on_a_fused_qkv_denoiser_is_refused_not_ignored(cli, tmp_path: Path, assets: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog <lora:style:0.5>\n")
    flags = ["--lora-dir", str(assets)]
    assert cli("--model", "tiny", "encode", str(prompts), *flags).returncode == 0
    result = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(tmp_path / "o"), *RENDER,
                 *flags, "--fuse-qkv")
    assert result.returncode == 3, result.stderr
    assert "cannot be switched in on a denoiser with --fuse-qkv" in result.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_a_lora_given_by_path_renders_from_any_folder(cli, tmp_path: Path, assets: Path) -> None:
    """`--lora /path/x.safetensors` and a JSONL `{"path": ...}` render wherever the command runs: the denoiser is
    handed the files the command resolved, not left to look their stems up in its own folder."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat"}) + "\n"
                       + json.dumps({"prompt": "a dog", "loras": [{"path": str(assets / "unetonly.safetensors")}]})
                       + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    flags = ["--lora", f"{assets / 'style.safetensors'}:0.7"]
    assert cli("--model", "tiny", "encode", str(prompts), *flags, cwd=elsewhere).returncode == 0
    out = tmp_path / "out"
    result = cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER, *flags,
                 cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.png"))) == 2


@pytest.mark.parametrize("prompt", ["a <lora:../style:0.5>", "a <lora:/etc/passwd>", "a <lora:.hidden>"])
def test_a_lora_name_in_a_prompt_cannot_leave_the_lora_dir(session_cache: Path, assets: Path, prompt: str) -> None:
    resolver = ExtrasResolver((), assets / "sub", (), None, session_cache)
    (assets / "sub").mkdir(exist_ok=True)
    with pytest.raises(UserError, match="must be a plain file name in --lora-dir"):
        resolver.resolve(PromptEntry(line=1, prompt=prompt))


@pytest.mark.parametrize("where", ["flag", "jsonl"])
def test_a_lora_path_that_does_not_exist_is_named_as_a_missing_file(session_cache: Path, tmp_path: Path,
                                                                    where: str) -> None:
    missing = str(tmp_path / "nope" / "x.safetensors")
    flag = ((missing, 0.7),) if where == "flag" else ()
    entry = PromptEntry(line=1, prompt="a cat", loras=((missing, 0.7),) if where == "jsonl" else None)
    with pytest.raises(UserError, match=f"LoRA file {missing} not found; check the path"):
        ExtrasResolver(flag, None, (), None, session_cache).resolve(entry)  # a flag fails here, a line on resolve
    with pytest.raises(UserError, match="is a folder; give a .safetensors file"):
        ExtrasResolver(((str(tmp_path), 0.7),), None, (), None, session_cache)


def test_a_jsonl_lora_name_with_a_path_in_it_is_refused_naming_the_line(tmp_path: Path) -> None:
    from sdxl_split.shared.prompts import parse_prompt_file

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "a cat", "loras": [{"name": "../../x"}]}\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: LoRA name '../../x' must be a plain file name"):
        parse_prompt_file(prompts)


def test_a_lora_declaring_an_impossible_shape_is_refused_before_anything_allocates(cli, tmp_path: Path) -> None:
    """A header may declare a rank of 2^40 over zero bytes of data; PEFT would allocate it (terabytes) before
    failing. The declared shapes are checked first."""
    from safetensors.torch import save

    lora = tmp_path / "huge.safetensors"
    lora.write_bytes(save({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                           torch.zeros((2**40, 0)),
                           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight":
                           torch.zeros((32, 4))}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = cli("--model", "tiny", "encode", str(prompts), "--lora", str(lora))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "declares shape [1099511627776, 0]" in lines[0] and str(lora) in lines[0]


def test_pngs_name_loras_by_the_hash_a1111_and_civitai_use(cli, tmp_path: Path, assets: Path) -> None:
    """A1111 writes a .safetensors LoRA's "addnet" hash (sha256 of the bytes past the header, so metadata edits do
    not change it), or the file's own `sshs_model_hash`; a textual inversion by its whole file's sha256."""
    import hashlib
    import struct

    from safetensors.torch import load_file as load_tensors
    from safetensors.torch import save

    from sdxl_split.denoiser_service.outputs import read_png_metadata

    data = (assets / "style.safetensors").read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    addnet = hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    assert addnet != hashlib.sha256(data).hexdigest()[:12]
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(data)
    (loras / "stamped.safetensors").write_bytes(save(load_tensors(str(assets / "detail.safetensors")),
                                                     metadata={"sshs_model_hash": "0123456789abcdef" * 4}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat <lora:style:0.5> sparkle\na dog <lora:stamped>\n")
    flags = ["--lora-dir", str(loras), "--embedding", str(assets / "sparkle.safetensors")]
    assert cli("--model", "tiny", "encode", str(prompts), *flags).returncode == 0
    out = tmp_path / "out"
    assert cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), *RENDER,
               *flags).returncode == 0
    texts = sorted(read_png_metadata(png)[0] for png in out.glob("*.png"))
    inversion = hashlib.sha256((assets / "sparkle.safetensors").read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "style: {addnet}"' in texts[0] and f'TI hashes: "sparkle: {inversion}"' in texts[0]
    assert 'Lora hashes: "stamped: 0123456789ab"' in texts[1]


@pytest.mark.parametrize("vectors, problem", [
    ({"clip_l": torch.zeros(0, 32), "clip_g": torch.zeros(0, 64)}, "no vectors; the file is damaged"),
    ({"clip_l": torch.full((1, 32), float("nan")), "clip_g": torch.zeros(1, 64)}, "hold NaN or Inf"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "768 wide but this model's encoder takes 32"),
    ({"clip_g": torch.zeros(1, 64)}, "holds no clip_l tensor"),
    ({"clip_l": torch.zeros(1, 1, 32), "clip_g": torch.zeros(1, 64)}, "is not a textual inversion"),
    ({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(1, 64)}, "2 clip_l vectors but 1 clip_g vectors"),
])
def test_a_bad_textual_inversion_is_refused_at_load_in_one_line(cli, tmp_path: Path, vectors: dict,
                                                                 problem: str) -> None:
    from safetensors.torch import save

    embedding = tmp_path / "oddstyle.safetensors"
    embedding.write_bytes(save(vectors))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat in oddstyle\n")
    result = cli("--model", "tiny", "encode", str(prompts), "--embedding", str(embedding))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith(f"error: textual inversion {embedding}") and problem in lines[-1], lines[-1]
    assert "{" not in lines[-1] and "Traceback" not in result.stderr
    assert not list((tmp_path / "cache" / "embeddings").glob("*/*")), "nothing poisoned is cached"
