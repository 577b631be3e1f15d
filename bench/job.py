"""What one row's child process is told to do: its task, a frozen record written as JSON for `python -m bench.row`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.models.resolve import ModelSource
from sdxl_split.shared.prompts import PromptEntry
from sdxl_split.shared.settings import GlobalOptions


@dataclass(frozen=True)
class RowTask:
    row_id: str
    side: str
    # The parent's resolved ModelSource, so a child neither re-resolves (no hub call) nor races a build.
    source: dict
    cache_dir: str
    prompts: tuple[str, ...]
    # The settings the encoder row caches embeddings under, and denoiser rows look them up with.
    encoding: dict
    encoder_device: str
    # RenderConfig.as_dict() for denoiser and monolith rows; None for the encoder row.
    render: dict | None
    repeats: int
    # Test hook: the child kills itself with SIGKILL once loaded, as the OOM killer would.
    crash: bool = False
    verbosity: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RowTask:
        raw = json.loads(text)
        raw["prompts"] = tuple(raw["prompts"])
        return cls(**raw)

    def render_config(self) -> RenderConfig:
        if self.render is None:
            raise ValueError(f"row {self.row_id} has no render settings")
        return RenderConfig(**{**self.render, "out_dir": Path(self.render["out_dir"])})

    def encoding_settings(self) -> EncodingSettings:
        return EncodingSettings(**self.encoding)

    def entries(self) -> list[PromptEntry]:
        return [PromptEntry(line=index + 1, prompt=text) for index, text in enumerate(self.prompts)]

    def model_source(self) -> ModelSource:
        raw = dict(self.source)
        raw["config_dir"] = Path(raw["config_dir"]) if raw.get("config_dir") else None
        return ModelSource(**raw)

    def global_options(self) -> GlobalOptions:
        return GlobalOptions(model=self.source["spec"], revision=self.source["revision"],
                             cache_dir=Path(self.cache_dir), verbosity=self.verbosity)


def source_dict(source: ModelSource) -> dict:
    return {**asdict(source), "config_dir": str(source.config_dir) if source.config_dir else None}
