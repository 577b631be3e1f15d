"""What the encoder's component tests share: the prompt rows, a cache filled by an encode that cannot build a
UNet or VAE (the `base` fixture, once per module), and helpers to read that cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result
from conftest import cli_env, hang_bound, invoke_cli
from safetensors import safe_open

from sdxl_split.cli.main import cli as cli_group
from sdxl_split.shared.embedding_cache import EmbeddingCache, Hit
from sdxl_split.shared.embeddings import Embeddings
from sdxl_split.shared.encoding_settings import EncodingSettings, embedding_key, encoding_settings
from sdxl_split.shared.models.resolve import resolve_model
from sdxl_split.shared.prompts import PromptEntry

LONG_PROMPT = " ".join(["cat"] * 80) + " zebra giraffe"
ROWS: list[dict] = [
    {"prompt": "a photo of a cat"},
    {"prompt": "a red car at night", "negative_prompt": "blurry"},
    {"prompt": "a house", "prompt_2": "oil painting, impasto", "negative_prompt": "ugly",
     "negative_prompt_2": "low quality"},
    {"prompt": "a tree", "prompt_2": "watercolor"},
    {"prompt": LONG_PROMPT},
]
ENTRIES = [PromptEntry(line=number, **row) for number, row in enumerate(ROWS, start=1)]
N = len(ROWS)

# Runs `sdxl-split` in a process where building a UNet or VAE raises, recording every safetensors
# file opened. The patches go in before anything imports diffusers or transformers, so the names
# those libraries bind at import time are the recording ones.
NO_DENOISER_SCRIPT = """
import json, os, sys
import safetensors, safetensors.torch
opened = []
real_load_file, real_safe_open = safetensors.torch.load_file, safetensors.safe_open
def load_file(filename, *args, **kwargs):
    opened.append(str(filename))
    return real_load_file(filename, *args, **kwargs)
def safe_open(filename, *args, **kwargs):
    opened.append(str(filename))
    return real_safe_open(filename, *args, **kwargs)
safetensors.torch.load_file = load_file
safetensors.safe_open = safe_open
import diffusers
def refuse(self, *args, **kwargs):
    raise RuntimeError("the encoder built a " + type(self).__name__)
for name in ("UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny"):
    getattr(diffusers, name).__init__ = refuse
from sdxl_split.cli.main import main
try:
    main(sys.argv[1:])
finally:
    with open(os.environ["OPENED_LOG"], "w") as log:
        json.dump(opened, log)
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def encode_json(cache: Path, prompts: Path, *flags: str, model: str = "tiny") -> tuple[dict, str]:
    """Run the real CLI (in this process) with --json; return its stats and stderr."""
    done = invoke_cli("--model", model, "encode", str(prompts), "--json", *flags, cache=cache)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["stats"], done.stderr


def settings_for(cache: Path, model: str = "tiny", dtype: str = "fp32", clip_skip: int | None = None
                 ) -> EncodingSettings:
    """The key settings exactly as `encode` derives them."""
    return encoding_settings(resolve_model(model, cache), cache, dtype, clip_skip)


def cache_path(cache: Path, entry: PromptEntry, settings: EncodingSettings) -> Path:
    return EmbeddingCache(cache / "embeddings").path_for(embedding_key(entry.texts(), settings))


def load_record(cache: Path, entry: PromptEntry, settings: EncodingSettings) -> Embeddings:
    found = EmbeddingCache(cache / "embeddings").lookup(embedding_key(entry.texts(), settings))
    assert isinstance(found, Hit), f"no valid cache file for line {entry.line}: {found}"
    return found.record


def header_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def fork_cache(source: Path, target: Path) -> Path:
    """A private copy of a populated cache (the model stays a symlink) for a test that changes it."""
    shutil.copytree(source, target, symlinks=True)
    return target


def cache_cli(cache: Path, *args: str) -> Result:
    """`sdxl-split cache ...` in-process: nothing here needs a fresh interpreter."""
    return CliRunner().invoke(cli_group, ["--cache-dir", str(cache), "cache", *args], catch_exceptions=False)


def filled_cache(tmp_path_factory, session_cache: Path) -> dict:
    """One cache filled with ROWS by an encode whose process cannot build a UNet or VAE (a module fixture's body)."""
    root = tmp_path_factory.mktemp("encoder")
    cache = root / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "tiny").symlink_to(session_cache / "models" / "tiny")
    prompts = write_jsonl(root / "prompts.jsonl", ROWS)
    log = root / "opened.json"
    done = subprocess.run(
        [sys.executable, "-c", NO_DENOISER_SCRIPT, "--model", "tiny", "encode", str(prompts), "--json"],
        capture_output=True, text=True, timeout=hang_bound(600),
        env=cli_env(cache, OPENED_LOG=str(log)),
    )
    return {"cache": cache, "prompts": prompts, "done": done, "opened": json.loads(log.read_text())}
