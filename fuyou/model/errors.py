"""The model layer's errors (one line each, naming the problem and the fix)."""


class UnsupportedModelError(ValueError):
    """The architecture cannot be run block by block; the message says why."""


class ModelError(ValueError):
    """The model source cannot be used (the message names the problem and the fix)."""
