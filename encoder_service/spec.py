"""What an encode run is started with: the frozen spec `encode` and `run` build, and `run`'s encoder process
receives as JSON. No torch here: the process that builds it only plans the work."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sdxl_split.encoder_service.config import EncodeConfig, LinkConfig
from sdxl_split.encoder_service.journal import journal_path
from sdxl_split.shared.encoding_settings import EncodingSettings
from sdxl_split.shared.faults import Faults
from sdxl_split.shared.models.resolve import ModelSource
from sdxl_split.shared.prompt_extras import ExtrasSpec
from sdxl_split.shared.prompts import PromptEntry


@dataclass(frozen=True)
class EncodeSpec:
    """Everything one encode run needs, resolved by the parent: the prompt file is parsed and the model
    resolved once, there."""

    prompts_path: Path
    # A prompt file's absolute path, or a hash of prompts from stdin or --prompt: what names its journal.
    prompts_identity: str
    entries: tuple[PromptEntry, ...]
    skipped_lines: int
    source: ModelSource
    settings: EncodingSettings
    cache_dir: Path
    config: EncodeConfig
    link: LinkConfig
    # Seconds to wait for a denoiser once the cache is filled.
    wait_s: float = 10.0
    extras: ExtrasSpec = ExtrasSpec()
    faults: Faults = Faults()

    @property
    def journal_path(self) -> Path:
        return journal_path(self.cache_dir, self.prompts_path.stem, self.prompts_identity,
                            json.dumps(asdict(self.settings), sort_keys=True))
