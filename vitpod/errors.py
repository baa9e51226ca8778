"""The one exception type for bad input: entrypoints print its message as one line."""


class UserError(Exception):
    """A problem the user can fix (bad config, data or workdir); the message says how."""
