"""Errors a user caused and can fix, and the exit codes every command shares."""

# Exit codes: 0 done; 2 bad input (one line on stderr); 3 some jobs failed or were left unrendered.
EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 3


class UserError(Exception):
    """Bad input or an impossible request. The message says what was wrong and how to fix it."""

    exit_code = EXIT_BAD_INPUT


class ModelNotFoundError(UserError):
    """A --model that is neither a known name, a local path, nor a reachable hub repo."""
