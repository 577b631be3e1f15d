"""LoRA files as both sides of the split see them: found by name or path, identified by content hash, and split
into what changes the text encoders (the encoder's business) and what changes the UNet (the denoiser's).

A LoRA is asked for by `--lora FILE[:SCALE]`, by an A1111 tag `<lora:NAME:SCALE>` in the prompt (NAME looked up
in --lora-dir), or by a JSONL `loras` list. The tag is taken out of the text before encoding, as A1111 does.
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


@dataclass(frozen=True)
class LoraUse:
    """One LoRA as a job carries it: enough for each side to find the very same file and apply it."""

    name: str
    sha256: str
    scale: float


@dataclass(frozen=True)
class Lora:
    """A LoRA file found on this host."""

    name: str
    path: Path
    sha256: str
    text: bool  # has text-encoder weights
    unet: bool  # has UNet weights

    def use(self, scale: float) -> LoraUse:
        return LoraUse(self.name, self.sha256, scale)


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


def halves(path: Path) -> tuple[bool, bool]:
    """(has text-encoder weights, has UNet weights), from the safetensors header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # safetensors raises its own types for files that are not safetensors
        raise UserError(f"LoRA {path} is not a readable .safetensors file ({str(err)[:120]})") from None
    return (any(k.startswith(_TEXT_PREFIXES) for k in keys), any(k.startswith(_UNET_PREFIXES) for k in keys))


class LoraFinder:
    """Resolves names and paths to files, memoising their hashes under the cache dir."""

    def __init__(self, lora_dir: Path | None, cache_dir: Path) -> None:
        self.lora_dir = lora_dir
        self.memo = DigestMemo(cache_dir)
        self._found: dict[Path, Lora] = {}

    def find(self, name_or_path: str) -> Lora:
        path = Path(name_or_path).expanduser()
        if not path.is_file() and self.lora_dir is not None:
            named = self.lora_dir / name_or_path
            path = named if named.is_file() else named.with_name(named.name + ".safetensors")
        if not path.is_file():
            where = f" in --lora-dir {self.lora_dir}" if self.lora_dir else " (and no --lora-dir is set)"
            raise UserError(f"LoRA {name_or_path!r} not found: no such file{where}")
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"LoRA {path} is not a .safetensors file; pickled LoRAs are refused")
        path = path.resolve()
        if path not in self._found:
            text, unet = halves(path)
            self._found[path] = Lora(name=path.stem, path=path, sha256=self.memo.sha256(path), text=text, unet=unet)
            self.memo.save()
        return self._found[path]

    def by_hash(self, use: LoraUse) -> Lora | None:
        """The file for a LoRA a job names: its name under --lora-dir (or a path it was found at), with the
        same sha256; None when this host has no such file."""
        for candidate in (use.name, f"{use.name}.safetensors"):
            try:
                lora = self.find(candidate)
            except UserError:
                continue
            if lora.sha256 == use.sha256:
                return lora
        return next((lora for lora in self._found.values() if lora.sha256 == use.sha256), None)
