"""The model layer's errors (one line each, naming the problem and the fix)."""


class UnsupportedModelError(ValueError):
    """The architecture cannot be run block by block; the message says why."""
