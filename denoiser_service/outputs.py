"""Writes rendered images: atomic PNGs with A1111 and JSON metadata, and an append-only manifest."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdxl_split.shared.atomic import append_line, atomic_write_bytes
from sdxl_split.shared.encoding_settings import A1111_CLIP_SKIP_BASE

MANIFEST = "manifest.jsonl"
CONFIG_CHUNK = "sdxl-split"


@dataclass(frozen=True)
class ImageMeta:
    image_id: str
    render_id: str
    index: int
    seed: int
    prompt: str
    negative_prompt: str | None
    embedding_key: str
    sampler: str
    model: str
    model_hash: str
    config: dict
    model_source: str | None = None
    lora_hashes: str | None = None
    ti_hashes: str | None = None

    def a1111_parameters(self) -> str:
        """The `parameters` text chunk in the form A1111, ComfyUI and most image browsers read."""
        c = self.config
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {c['steps']}, Sampler: {self.sampler}, CFG scale: {c['guidance']}, Seed: {self.seed}, "
            f"Size: {c['width']}x{c['height']}, Model hash: {self.model_hash[:10]}, Model: {self.model}"
            + (f", Clip skip: {c['clip_skip'] + A1111_CLIP_SKIP_BASE}" if c.get("clip_skip") else "")
            + (f', Lora hashes: "{self.lora_hashes}"' if self.lora_hashes else "")
            + (f', TI hashes: "{self.ti_hashes}"' if self.ti_hashes else "")
            + (f", Prompt syntax: {syntax}" if (syntax := self.prompt_syntax()) else "")
        )
        return "\n".join(lines)

    def prompt_syntax(self) -> str | None:
        """How the prompt was read, when it matters: any syntax but plain, and plain for a prompt with brackets,
        which A1111 would weight and plain did not."""
        syntax = self.config.get("prompt_syntax") or "plain"
        texts = (self.prompt, self.negative_prompt or "")
        return syntax if syntax != "plain" or any(c in text for text in texts for c in "([") else None


def png_bytes(image: Image.Image, meta: ImageMeta) -> bytes:
    info = PngInfo()
    info.add_text("parameters", meta.a1111_parameters())
    info.add_text(CONFIG_CHUNK, json.dumps({
        # "job_id" holds the render id: the key is kept so that files stay byte-identical to earlier releases.
        "image_id": meta.image_id, "job_id": meta.render_id, "index": meta.index, "seed": meta.seed,
        "embedding_key": meta.embedding_key, "model": meta.model, "config": meta.config,
        **({"model_source": meta.model_source} if meta.model_source else {}),
    }, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@dataclass(frozen=True)
class WrittenImage:
    path: Path
    sha256: str
    existed: bool
    data: bytes = field(default=b"", repr=False, compare=False)  # the PNG file's bytes


class OutputDir:
    """One output folder. Existence of the final file means it is complete: every write is a rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.manifest = root / MANIFEST
        self._recorded: set[str] = set()
        self._read_upto = 0

    def _catch_up(self, handle) -> None:
        """Learn the ids other processes appended since we last looked (several denoisers may share a folder)."""
        handle.seek(self._read_upto)
        for line in handle.read().decode("utf-8", errors="replace").splitlines():
            try:
                self._recorded.add(json.loads(line)["image_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from a crash; that image is recorded again
        self._read_upto = handle.tell()

    def recorded_digests(self) -> dict[str, str]:
        """{file name: sha256} of every image the manifest lists (a torn last line is skipped)."""
        digests: dict[str, str] = {}
        if not self.manifest.is_file():
            return digests
        for line in self.manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                digests[str(row["file"])] = str(row["sha256"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        return digests

    def exists(self, filename: str) -> bool:
        return (self.root / filename).is_file()

    def adopt(self, filename: str, meta: ImageMeta) -> WrittenImage:
        """An image a previous run finished: keep it, and make sure the manifest lists it."""
        path = self.root / filename
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        self.record(filename, digest, meta)
        return WrittenImage(path=path, sha256=digest, existed=True, data=data)

    def write(self, filename: str, image: Image.Image, meta: ImageMeta) -> WrittenImage:
        if self.exists(filename):
            return self.adopt(filename, meta)
        data = png_bytes(image, meta)
        atomic_write_bytes(self.root / filename, data)
        digest = hashlib.sha256(data).hexdigest()
        self.record(filename, digest, meta)
        return WrittenImage(path=self.root / filename, sha256=digest, existed=False, data=data)

    def record(self, filename: str, digest: str, meta: ImageMeta) -> None:
        """List the image in manifest.jsonl once, even with several processes writing into this folder."""
        line = json.dumps({
            "image_id": meta.image_id, "job_id": meta.render_id, "file": filename, "sha256": digest,
            "index": meta.index, "seed": meta.seed, "prompt": meta.prompt, "negative_prompt": meta.negative_prompt,
            "steps": meta.config.get("steps"), "width": meta.config.get("width"), "height": meta.config.get("height"),
            "embedding_key": meta.embedding_key, "time": time.time(),
        }, sort_keys=True, ensure_ascii=False)
        with self.manifest.open("a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # check-then-append must not interleave with another writer
            try:
                self._catch_up(handle)
                if meta.image_id in self._recorded:
                    return
                append_line(self.manifest, line)
                self._recorded.add(meta.image_id)
                self._read_upto = self.manifest.stat().st_size
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def read_png_metadata(path: Path) -> tuple[str, dict]:
    """(A1111 parameters text, sdxl-split JSON) of a PNG written here."""
    with Image.open(path) as image:
        text = image.text  # type: ignore[attr-defined]
        return text["parameters"], json.loads(text[CONFIG_CHUNK])
