"""The one exception type for bad input, and the one-line form every message takes.

Standard library only: deploy/ and the worker check import it without jax.
"""


class UserError(Exception):
    """A problem the user can fix (bad config, data or workdir); the message says how."""


def one_line(text: object) -> str:
    """The last non-blank line of a message (or an exception's text): what a user is shown."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


class NotFound(UserError):
    """A file or object that is not there (its bucket is)."""
