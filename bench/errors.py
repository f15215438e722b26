"""The one exception type users see: a leaf module, so every other module can raise it without import cycles."""


class BenchError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero (2 for bad input)."""
