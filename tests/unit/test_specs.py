"""Frozen configs cross to child processes as JSON and come back equal; a bad spec is refused, not half-read."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.naming import ModelIdentity
from sdxl_split.denoiser_service.spec import DenoiserSpec, ServeSpec
from sdxl_split.encoder_service.config import EncodeConfig, LinkConfig
from sdxl_split.encoder_service.spec import EncodeSpec
from sdxl_split.shared import specs
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.models.resolve import ModelSource
from sdxl_split.shared.prompt_extras import ExtrasSpec
from sdxl_split.shared.prompts import PromptEntry

SOURCE = ModelSource(spec="tiny", kind="folder", location="/m/tiny", config_dir=Path("/m/tiny"), random_weights=True)


def test_run_specs_round_trip_through_json() -> None:
    encode = EncodeSpec(
        prompts_path=Path("p.txt"), prompts_identity="/abs/p.txt",
        entries=(PromptEntry(line=1, prompt="a cat", seed=3), PromptEntry(2, "dog")),
        skipped_lines=1, source=SOURCE,
        settings=EncodingSettings(fingerprint="sha256:x", clip_skip=None, dtype="fp32", force_zeros=True),
        cache_dir=Path("/c"), config=EncodeConfig(batch_size=2),
        link=LinkConfig(endpoint="ipc:///tmp/x", curve_dir=None, max_attempts=4), wait_s=30.0)
    serve = ServeSpec(denoiser=DenoiserSpec(source=SOURCE, identity=ModelIdentity("tiny", "sha256:y"),
                                            config=RenderConfig(out_dir=Path("o"), steps=4, guidance=6),
                                            cache_dir=Path("/c"),
                                            extras=ExtrasSpec(run_loras=(("detail", 0.5),), lora_dir=Path("/l"))),
                      endpoint="ipc:///tmp/x", credits=3, curve_dir=Path("/keys"))
    assert specs.loads(EncodeSpec, specs.dumps(encode)) == encode
    assert specs.loads(ServeSpec, specs.dumps(serve)) == serve


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.update(credits="3"), "credits: expected int"),
    (lambda raw: raw["denoiser"]["source"].update(kind="ftp"), "not one of"),
    (lambda raw: raw.update(surprise=1), "unknown field 'surprise'"),
    (lambda raw: raw.pop("endpoint"), "missing field 'endpoint'"),
    (lambda raw: raw["denoiser"]["config"].update(steps=True), "expected int"),
])
def test_a_spec_that_does_not_fit_is_refused(change, message: str) -> None:
    serve = ServeSpec(denoiser=DenoiserSpec(SOURCE, ModelIdentity("tiny", "f"), RenderConfig(), Path("/c")),
                      endpoint="ipc://x")
    raw = specs.to_jsonable(serve)
    change(raw)
    with pytest.raises(specs.SpecError, match=message):
        specs.from_jsonable(ServeSpec, raw)
