"""What an encoder shows while it runs: prompts encoded, jobs rendered by its denoisers (fed by their DONEs), and
one line per failed, re-queued or dead-lettered job, all through tqdm so no message tears a bar."""

from __future__ import annotations

import sys

from tqdm import tqdm

from sdxl_split.shared.text import plural


class EncodeProgress:
    def __init__(self, prompts: int, disable: bool = False) -> None:
        self.disable = disable
        self.prompts = tqdm(total=prompts, unit="prompt", desc="encode", disable=True if disable else None,
                            leave=False, position=0, file=sys.stderr)
        # Its total grows as jobs are queued; it appears once the first job does.
        self.jobs = tqdm(total=0, unit="job", desc="render", disable=True if disable else None, leave=False,
                         position=1, file=sys.stderr)
        self.images = 0

    def notice(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    def encoded(self, count: int) -> None:
        self.prompts.update(count)

    def event(self, name: str, job_id: str, fields: dict) -> None:
        """One journal event of the dispatcher."""
        if name == "queued":
            self.jobs.total += 1
            self.jobs.refresh()
        elif name == "done":
            self.images += len(fields.get("images") or [])
            self.jobs.set_postfix_str(plural(self.images, "image"), refresh=False)
            self.jobs.update(1)
        elif name == "requeued" and not fields.get("stopping"):  # a stop's hand-backs are the stop line's story
            self.notice(f"re-queued job {job_id[:12]} (attempt {fields.get('attempt')}): {fields.get('reason')}")
        elif name == "failed" and fields.get("scope") == "job":
            self.notice(f"job {job_id[:12]} failed on {fields.get('worker')}: {fields.get('reason')}")

    def close(self) -> None:
        self.jobs.close()
        self.prompts.close()

    def __enter__(self) -> EncodeProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
