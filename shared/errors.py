"""Errors a user caused and can fix, and the exit codes every command shares."""

import errno

# Exit codes: 0 done; 2 bad input (one line on stderr); 3 some jobs failed or were left unrendered.
EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 3


def first_line(err: BaseException, limit: int = 160) -> str:
    """A library's error in a few words: the first line of its message (they run to paragraphs)."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def os_error_line(err: OSError) -> str:
    """One line for an unusable folder, a full disk or a permission, naming the path."""
    where = f": {err.filename}" if err.filename else ""
    # Every write is a rename of a finished temp file, so a failed one leaves nothing half-written.
    after = ("; nothing finished was lost: free some space and re-run the same command to go on"
             if err.errno == errno.ENOSPC else "")
    return f"error: {err.strerror or err}{where}{after}"


class UserError(Exception):
    """Bad input or an impossible request. The message says what was wrong and how to fix it."""

    exit_code = EXIT_BAD_INPUT


class JobError(Exception):
    """This job cannot be rendered (bad embeddings for this model, NaN output); other jobs go on."""


class NotOnThisDenoiser(JobError):
    """This denoiser cannot render the job (a LoRA it lacks, a fixed LoRA set it is not); another denoiser may."""


class ModelNotFoundError(UserError):
    """A --model that is neither a known name, a local path, nor a reachable hub repo."""
