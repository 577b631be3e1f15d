"""The render line's timing: the model's load is counted once and apart, so a short run's seconds per image are
the renders alone. A fake clock makes it exact on any machine."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from sdxl_split.denoiser_service import renderer as renderer_module
from sdxl_split.denoiser_service.naming import ImageBatch
from sdxl_split.denoiser_service.outputs import ImageMeta, OutputDir
from sdxl_split.denoiser_service.renderer import Renderer
from sdxl_split.shared.prompts import PromptEntry


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch(name: str) -> ImageBatch:
    meta = ImageMeta(image_id=name * 64, render_id="r" * 64, index=0, seed=0, prompt="a cat", negative_prompt=None,
                     embedding_key="k" * 64, sampler="Euler", model="tiny", model_hash="abc",
                     config={"steps": 1, "guidance": 5.0, "width": 8, "height": 8})
    return ImageBatch("r" * 64, PromptEntry(line=1, prompt="a cat"), record=None, seed=0, count=1, metas=(meta,),
                      filenames=(f"{name}.png",))


def test_the_load_is_timed_apart_from_the_renders(tmp_path: Path, monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(renderer_module.time, "perf_counter", clock)
    loads = []

    def render(*args, **kwargs):
        clock.now += 0.5
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))], retried_fp32=False)

    def load():
        loads.append(1)
        clock.now += 30.0  # weights on a slow disk
        return SimpleNamespace(render=render)

    renderer = Renderer(load, OutputDir(tmp_path))
    renderer.run(batch("a"))
    renderer.run(batch("b"))
    renderer.run(batch("a"))  # already written: neither a render nor a second load
    stats = renderer.stats
    assert loads == [1]
    assert (stats.load_seconds, stats.render_seconds, stats.images, stats.existing) == (30.0, 1.0, 2, 1)
    assert stats.seconds_per_image == 0.5


def test_a_run_whose_images_all_exist_never_loads_the_model(tmp_path: Path) -> None:
    OutputDir(tmp_path).write("a.png", Image.new("RGB", (8, 8)), batch("a").metas[0])

    def load():
        raise AssertionError("loaded a model for images that exist")

    renderer = Renderer(load, OutputDir(tmp_path))
    renderer.run(batch("a"))
    assert (renderer.stats.load_seconds, renderer.stats.existing) == (0.0, 1)
