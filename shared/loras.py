"""LoRA files as both sides of the split see them: found by name or path, identified by content hash, checked before
anything allocates, and split into what changes the text encoders (the encoder's business) and what changes the
UNet (the denoiser's).

A LoRA is asked for by `--lora FILE[:SCALE]` (a path, or a name), by an A1111 tag `<lora:NAME:SCALE>` in the prompt
or a JSONL `{"name": ...}` (a plain name, looked up in --lora-dir and never outside it), or by a JSONL
`{"path": ...}`. The tag is taken out of the text before encoding, as A1111 does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from sdxl_split.shared.digests import DigestMemo
from sdxl_split.shared.errors import UserError

LORA_DIR_ENV = "SDXL_SPLIT_LORA_DIR"
# <lora:NAME> or <lora:NAME:SCALE>; A1111 ignores anything past a second colon (a separate UNet weight), and so
# do we.
_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
_UNET_PREFIXES = ("unet.", "lora_unet_")
MAX_SCALE = 100.0
# No layer of SDXL (or of any model it could be mistaken for) is wider than this; a LoRA tensor declaring a larger
# (or an empty) dimension is damaged or hostile, and would make PEFT allocate its rank before anything fails.
MAX_LORA_DIM = 65536
# A1111 shows a LoRA by the first 12 hex digits of its hash.
A1111_HASH_CHARS = 12


@dataclass(frozen=True)
class LoraUse:
    """One LoRA as a job carries it: enough for each side to find the very same file and apply it, and for the PNG
    to name it as A1111 does."""

    name: str
    sha256: str
    scale: float
    # A1111's short hash (`Lora hashes` in the infotext): the file's `sshs_model_hash`, else the sha256 of its
    # tensor data; empty for records made before it was kept.
    a1111_hash: str = ""


@dataclass(frozen=True)
class Lora:
    """A LoRA file found on this host."""

    name: str
    path: Path
    sha256: str
    text: bool  # has text-encoder weights
    unet: bool  # has UNet weights
    a1111_hash: str = ""

    def use(self, scale: float) -> LoraUse:
        return LoraUse(self.name, self.sha256, scale, self.a1111_hash)


def parse_scale(text: str, what: str) -> float:
    try:
        scale = float(text)
    except ValueError:
        raise UserError(f"{what}: scale {text!r} is not a number") from None
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise UserError(f"{what}: scale {scale} must be a finite number within +-{MAX_SCALE:g}")
    return scale


def parse_flag(text: str) -> tuple[str, float]:
    """--lora FILE[:SCALE] (a Windows-free world: the last colon is the scale's only if a number follows)."""
    head, _, tail = text.rpartition(":")
    if head and tail and re.fullmatch(r"[+-]?[\d.]+(e[+-]?\d+)?", tail):
        return head, parse_scale(tail, f"--lora {text}")
    return text, 1.0


def strip_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its <lora:...> tags, and the (name, scale) each asked for (scale 1.0 when left out)."""
    found = []
    for match in _TAG.finditer(text):
        scale = match.group(2)
        found.append((match.group(1).strip(), parse_scale(scale, match.group(0)) if scale else 1.0))
    return (_TAG.sub("", text) if found else text), found


def plain_name_problem(name: str) -> str | None:
    """Why a LoRA name from a prompt or a peer is not a plain file name (one that cannot leave --lora-dir)."""
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or name.startswith("."):
        return f"LoRA name {name!r} must be a plain file name in --lora-dir (no folders, no leading dot)"
    return None


def declared(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(every tensor's declared shape, metadata) from the safetensors header alone: nothing is allocated."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            return shapes, handle.metadata() or {}
    except Exception as err:  # safetensors raises its own types for files that are not safetensors
        raise UserError(f"LoRA {path} is not a readable .safetensors file ({str(err)[:120]})") from None


def shape_problem(shapes: dict[str, tuple[int, ...]], max_dim: int) -> str | None:
    """A declared tensor with an empty dimension, or one wider than `max_dim` (the model's widest layer)."""
    for key, shape in shapes.items():
        if any(dim < 1 or dim > max_dim for dim in shape):
            return f"tensor {key} declares shape {list(shape)}, outside 1..{max_dim} in some dimension"
    return None


def widest_layer(*modules) -> int:
    """The largest dimension of any weight of these modules (torch modules): no LoRA for them can be wider."""
    return max(max(param.shape) for module in modules for param in module.parameters() if param.dim())


def check_shapes(path: Path, max_dim: int, half: str = "") -> dict[str, tuple[int, ...]]:
    """The declared shapes, refused in one line when one could not belong to a model whose widest layer is
    `max_dim`: the file is damaged, or made for another model. `half`: "text" or "unet" checks only the tensors
    of that half (a UNet layer may be wider than any text encoder's)."""
    shapes, _ = declared(path)
    _refuse_bad_shapes(path, shapes, max_dim, half)
    return shapes


def _refuse_bad_shapes(path: Path, shapes: dict[str, tuple[int, ...]], max_dim: int, half: str = "") -> None:
    prefixes = {"text": _TEXT_PREFIXES, "unet": _UNET_PREFIXES}.get(half, ("",))
    if problem := shape_problem({k: v for k, v in shapes.items() if k.startswith(prefixes)}, max_dim):
        raise UserError(f"LoRA {path}: {problem}; the file is damaged or not made for this model")


class LoraFinder:
    """Resolves names and paths to files, memoising their hashes under the cache dir."""

    def __init__(self, lora_dir: Path | None, cache_dir: Path) -> None:
        self.lora_dir = lora_dir
        self.memo = DigestMemo(cache_dir)
        self._found: dict[Path, Lora] = {}

    def find(self, name_or_path: str) -> Lora:
        """A --lora flag's file: a path, or a plain name in --lora-dir."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return self._load(path)
        if path.is_dir():
            raise UserError(f"LoRA {path.absolute()} is a folder; give a .safetensors file, or the folder as "
                            "--lora-dir and the file's name")
        if plain_name_problem(name_or_path):  # a path, not a name: say which file is missing, not how names go
            raise UserError(f"LoRA file {path.absolute()} not found; check the path (a relative one is taken from "
                            "the folder the command runs in)")
        return self.find_named(name_or_path)

    def find_named(self, name: str) -> Lora:
        """A name from a prompt, a JSONL line or a job: a file in --lora-dir (the current folder without one),
        with or without its .safetensors suffix; never a path elsewhere."""
        if problem := plain_name_problem(name):
            raise UserError(problem)
        folder = self.lora_dir if self.lora_dir is not None else Path.cwd()
        for candidate in (folder / name, folder / f"{name}.safetensors"):
            if candidate.is_file():
                return self._load(candidate)
        where = f"in --lora-dir {self.lora_dir}" if self.lora_dir else "here (and no --lora-dir is set)"
        raise UserError(f"LoRA {name!r} not found: no such file {where}")

    def register(self, path: Path) -> None:
        """A file resolved elsewhere (by `run`'s parent, say) that jobs may name by its hash."""
        self._load(path)

    def _load(self, path: Path) -> Lora:
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"LoRA {path} is not a .safetensors file; pickled LoRAs are refused")
        path = path.resolve()
        if path not in self._found:
            shapes, metadata = declared(path)
            _refuse_bad_shapes(path, shapes, MAX_LORA_DIM)
            short = str(metadata.get("sshs_model_hash") or self.memo.data_sha256(path))[:A1111_HASH_CHARS]
            self._found[path] = Lora(name=path.stem, path=path, sha256=self.memo.sha256(path),
                                     text=any(k.startswith(_TEXT_PREFIXES) for k in shapes),
                                     unet=any(k.startswith(_UNET_PREFIXES) for k in shapes), a1111_hash=short)
            self.memo.save()
        return self._found[path]

    def by_hash(self, use: LoraUse) -> Lora | None:
        """The file for a LoRA a job names: one registered or found before with the same sha256, else its name
        under --lora-dir; None when this host has no such file."""
        known = next((lora for lora in self._found.values() if lora.sha256 == use.sha256), None)
        if known is not None:
            return known
        try:
            lora = self.find_named(use.name)
        except UserError:
            return None
        return lora if lora.sha256 == use.sha256 else None
