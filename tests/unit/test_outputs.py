"""The output folder: several denoisers may share one, and each image is listed in the manifest once."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sdxl_split.denoiser_service.outputs import ImageMeta, OutputDir
from sdxl_split.http_service.infotext import parse_infotext


def meta(image_id: str) -> ImageMeta:
    return ImageMeta(image_id=image_id, render_id="j" * 64, index=0, seed=0, prompt="a cat", negative_prompt=None,
                     embedding_key="k" * 64, sampler="Euler", model="tiny", model_hash="abc",
                     config={"steps": 1, "guidance": 5.0, "width": 8, "height": 8})


def test_two_writers_sharing_a_folder_list_each_image_once(tmp_path: Path) -> None:
    first, second = OutputDir(tmp_path), OutputDir(tmp_path)
    image = Image.new("RGB", (8, 8))
    written = first.write("a.png", image, meta("a" * 64))
    again = second.write("a.png", image, meta("a" * 64))  # a re-queued job landing on another denoiser
    assert not written.existed and again.existed and again.sha256 == written.sha256
    second.write("b.png", image, meta("b" * 64))
    first.adopt("b.png", meta("b" * 64))
    OutputDir(tmp_path).adopt("a.png", meta("a" * 64))  # a later run
    ids = [json.loads(line)["image_id"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["a" * 64, "b" * 64]


def test_a_clip_skip_is_written_as_a1111_writes_it_and_none_is_not_written() -> None:
    """diffusers' clip_skip 3 is A1111's "Clip skip: 5" (its 1 and 2 both read SDXL's penultimate layer)."""
    plain = meta("a" * 64)
    skipped = ImageMeta(**{**plain.__dict__, "config": {**plain.config, "clip_skip": 3}})
    assert "Clip skip" not in plain.a1111_parameters()
    assert skipped.a1111_parameters().splitlines()[-1].endswith("Model: tiny, Clip skip: 5")
    assert parse_infotext(skipped.a1111_parameters())["Clip skip"] == "5"
