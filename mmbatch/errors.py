"""Errors a user can act on. The CLI turns them into exit code 2 with the message."""


class UsageError(ValueError):
    """Bad input the user can fix: a missing folder, the wrong corpus kind, an empty input."""
