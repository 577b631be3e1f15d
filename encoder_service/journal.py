"""The run journal: an append-only JSONL record of every job's states, read back to resume a run."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from sdxl_split.shared.atomic import append_line
from sdxl_split.shared.digests import intact

EVENTS = ("cancelled", "queued", "dispatched", "done", "failed", "requeued", "dead_letter", "abandoned")


def journal_path(cache_dir: Path, name: str, identity: str, settings_key: str) -> Path:
    """One journal per (prompts, encoding settings), so re-running the same command finds it. `identity`: a prompt
    file's absolute path, or a hash of prompts given on stdin or with --prompt (shared.prompts.PromptFile)."""
    run = hashlib.sha256(f"{identity}\0{settings_key}".encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "prompts"
    return cache_dir / "runs" / f"{stem}-{run}.jsonl"


class NoJournal:
    """A journal that keeps nothing: a server's jobs are answered over HTTP, and a re-run resumes nothing."""

    def log(self, event: str, job: str, **fields) -> None:
        pass

    def finished(self) -> dict:
        return {}


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def log(self, event: str, job: str, **fields) -> None:
        assert event in EVENTS
        append_line(self.path, json.dumps({"t": time.time(), "event": event, "job": job, **fields}, sort_keys=True))

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-append
            if isinstance(record, dict) and record.get("event") in EVENTS and isinstance(record.get("job"), str):
                out.append(record)
        return out

    def finished(self) -> dict[tuple[str, str, str], list[dict]]:
        """(job, output folder, render settings) -> images, for jobs whose `done` record names images that
        still exist there with the recorded hash. A new --out, or new --steps/--size/..., starts afresh."""
        done: dict[tuple[str, str, str], list[dict]] = {}
        for record in self.records():
            out_dir, images, settings = record.get("out_dir"), record.get("images"), record.get("settings")
            if (record["event"] == "done" and isinstance(out_dir, str) and out_dir and isinstance(images, list)
                    and isinstance(settings, str) and settings):
                done[(record["job"], out_dir, settings)] = images
        return {key: images for key, images in done.items() if _images_intact(Path(key[1]), images)}


def _images_intact(out_dir: Path, images: list) -> bool:
    return bool(images) and all(isinstance(image, dict) and isinstance(image.get("file"), str)
                                and intact(out_dir / image["file"], image.get("sha256")) for image in images)
