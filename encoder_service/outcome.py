"""What an encode run's summary means for its exit code; read by `encode` and by `run`'s own process, which
never imports the encoder itself."""

from __future__ import annotations


def some_failed(summary: dict) -> bool:
    """Exit 3: a job was dead-lettered, left unrendered while denoisers were there, or the run was stopped."""
    return bool(summary["dead_lettered"] or (summary["denoisers_attached"] and summary["abandoned"])
                or summary["interrupted"])
