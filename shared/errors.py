"""Errors a user caused and can fix; the CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input or an impossible request. The message says what was wrong and how to fix it."""

    exit_code = 2


class ModelNotFoundError(UserError):
    """A --model that is neither a known name, a local path, nor a reachable hub repo."""
