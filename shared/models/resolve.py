"""Turns a --model value into a source (built-in, local folder, single file or hub repo) and fingerprints it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sdxl_split.shared.digests import DigestMemo
from sdxl_split.shared.errors import ModelNotFoundError, UserError, first_line
from sdxl_split.shared.models.architectures import ARCHITECTURES, MARKER_FILE

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
BUILTIN_MODELS = tuple(ARCHITECTURES)
# Components whose weights and files decide the text embeddings, and those that decide the pixels.
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
DENOISE_COMPONENTS = ("unet", "vae", "vae_tiny", "scheduler")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SINGLE_FILE_SUFFIXES = (".safetensors",)
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

SourceKind = Literal["builtin", "folder", "single_file", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's components come from. `location` is a folder, a file, or a hub repo id."""

    spec: str
    kind: SourceKind
    location: str
    revision: str | None = None
    # Local folder holding model_index.json: the model itself, the hub snapshot, or (for single-file
    # checkpoints) SDXL base's configs and tokenizers.
    config_dir: Path | None = None
    random_weights: bool = False

    @property
    def description(self) -> str:
        note = " (random weights: memory and FLOPs are real, images are noise)" if self.random_weights else ""
        return f"{self.spec}{note}"


def builtin_model_dir(cache_dir: Path, name: str) -> Path:
    return cache_dir / "models" / name


def _read_marker(folder: Path) -> dict:
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return {}
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _folder_source(spec: str, folder: Path) -> ModelSource:
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"{folder} is a folder but has no model_index.json; point --model at a diffusers SDXL folder "
            "(the one holding model_index.json, unet/, vae/, text_encoder/ ...)"
        )
    marker = _read_marker(folder)
    return ModelSource(
        spec=spec,
        kind="folder",
        location=str(folder.resolve()),
        config_dir=folder.resolve(),
        random_weights=bool(marker.get("random_weights", False)),
    )


def _ensure_builtin(name: str, cache_dir: Path, announce: Callable[[str], None]) -> Path:
    """Build a built-in model once, however many processes ask at the same time (`run --denoisers 4` on a fresh
    machine): one builds under a lock, the others wait for it and use its folder."""
    folder = builtin_model_dir(cache_dir, name)
    if (folder / MARKER_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / MARKER_FILE).is_file():
            return folder  # built by whoever held the lock before us
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"{folder} exists but is not a complete model (an interrupted build?); remove it "
                            "and retry")
        announce(f"building the built-in '{name}' model (random weights) into {folder} ...")
        from sdxl_split.shared.models.builder import build_model  # diffusers: only when building

        build_model(ARCHITECTURES[name], folder)
    return folder


def _single_file_source(spec: str, path: Path, cache_dir: Path) -> ModelSource:
    # Single-file checkpoints carry no configs or tokenizers; ship SDXL base's own so loading stays offline.
    config_dir = cache_dir / "models" / "sdxl-base-configs"
    if not (config_dir / "model_index.json").is_file():
        from sdxl_split.shared.models.builder import write_config_folder

        write_config_folder(ARCHITECTURES["sdxl-random"], config_dir)
    return ModelSource(spec=spec, kind="single_file", location=str(path.resolve()), config_dir=config_dir)


def _hub_source(spec: str, revision: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(spec, revision=revision, allow_patterns=["model_index.json"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        if isinstance(err, LocalEntryNotFoundError):
            # huggingface_hub's own text runs to a paragraph; this is what it means.
            reason = "not in the local hub cache, and the hub is unreachable or HF_HUB_OFFLINE is set"
        else:
            reason = first_line(err)
        raise ModelNotFoundError(
            f"cannot fetch model '{spec}' from the Hugging Face hub ({reason[:160]}); "
            "use --model tiny to try sdxl-split offline, or --model PATH for a local diffusers folder "
            "or .safetensors checkpoint"
        ) from None
    # The snapshot folder is named after the commit, which pins the revision for the fingerprint.
    return ModelSource(
        spec=spec, kind="hub", location=spec, revision=Path(snapshot).name, config_dir=Path(snapshot)
    )


def resolve_model(
    spec: str,
    cache_dir: Path,
    revision: str | None = None,
    announce: Callable[[str], None] = lambda message: None,
) -> ModelSource:
    """Resolve --model: a built-in name, a local folder, a .safetensors file, or a hub repo id."""
    if spec in BUILTIN_MODELS:
        folder = _ensure_builtin(spec, cache_dir, announce)
        return _folder_source(spec, folder)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return _folder_source(spec, path)
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise UserError(
                f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors first"
            )
        if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
            raise UserError(f"{path} is not a .safetensors checkpoint or a diffusers folder")
        return _single_file_source(spec, path, cache_dir)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(_SINGLE_FILE_SUFFIXES):
        raise UserError(f"model path {spec} does not exist")
    if not _HUB_ID.match(spec):
        raise UserError(
            f"--model {spec!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}), an existing path, "
            "or a hub id like owner/name"
        )
    return _hub_source(spec, revision)


def text_widths(source: ModelSource) -> tuple[int, int] | None:
    """(prompt_embeds width, pooled width) this model's text encoders produce, from their configs alone; None
    when the configs are not on disk (a hub model seen only through its model_index.json)."""
    if source.config_dir is None:
        return None
    try:
        first = json.loads((source.config_dir / "text_encoder" / "config.json").read_text())
        second = json.loads((source.config_dir / "text_encoder_2" / "config.json").read_text())
        return int(first["hidden_size"]) + int(second["hidden_size"]), int(second["projection_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def display_name(source: ModelSource) -> str:
    """The model's name as A1111 writes it in `Model:`: a hub id, a built-in name, a checkpoint's file stem or a
    folder's name; never a local path, which would leak into every shared image."""
    if source.kind == "hub":
        return source.spec
    return Path(source.location).stem if source.kind == "single_file" else Path(source.location).name


def model_index(source: ModelSource) -> dict:
    """The model's model_index.json, readable without loading any weights."""
    assert source.config_dir is not None
    try:
        return json.loads((source.config_dir / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read model_index.json of {source.spec}: {err}") from None


def fingerprint(source: ModelSource, components: tuple[str, ...], cache_dir: Path) -> str:
    """Identity of the parts of a model that matter to one side: repo+revision, or a content hash.

    Content hashes of multi-GB weights are memoised by (path, size, mtime) under the cache dir, so
    only the first run after a model changes pays for reading it.
    """
    if source.kind == "hub":
        return f"hub:{source.location}@{source.revision}"
    memo = DigestMemo(cache_dir)
    outer = hashlib.sha256()
    if source.kind == "single_file":
        outer.update(memo.sha256(Path(source.location)).encode())
    root = source.config_dir
    assert root is not None
    files = [root / "model_index.json"]
    for component in components:
        if (root / component).is_dir():
            files.extend(sorted(p for p in (root / component).rglob("*") if p.is_file()))
    for file in files:
        if file.is_file():
            outer.update(str(file.relative_to(root)).encode() + b"\0" + memo.sha256(file).encode())
    memo.save()
    return f"sha256:{outer.hexdigest()}"
