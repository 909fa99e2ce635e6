"""Errors a user can act on, and the exit codes every command returns.

The CLI turns :class:`UsageError` into exit code 2 with the message.
"""

EXIT_OK = 0            # done
EXIT_FAIL = 1          # failed (a bug, a crash, a cluster error)
EXIT_USAGE = 2         # bad input the user can fix (UsageError, a bad workflow file)
EXIT_QUARANTINED = 3   # done, but some samples were quarantined
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


class UsageError(ValueError):
    """Bad input the user can fix: a missing folder, the wrong corpus kind, an empty input."""


class LockLost(RuntimeError):
    """A writer's lock was taken over by another writer (it stalled past the stale limit, or lost its
    connection): it stopped before writing. The CLI prints the message and exits 1."""
