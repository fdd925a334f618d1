"""The one exception type for bad input: the command line prints its message and exits 2."""


class StagewiseError(Exception):
    """A user-facing error: the message names what was wrong and where."""
