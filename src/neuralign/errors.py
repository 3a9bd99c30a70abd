"""Error types. Every error neuralign raises on bad input is a ``NeuralignError``.

Messages are one line: what is wrong, and how to fix it.
"""


class NeuralignError(ValueError):
    """Base class of every error raised by neuralign on bad input."""


class CheckpointError(NeuralignError):
    """A checkpoint is missing, corrupt, truncated, pickled without opt-in, or does not fit."""


class DataError(NeuralignError):
    """A data set is missing or a loader yields something unusable."""


class ArchitectureMismatchError(NeuralignError):
    """Two models (or a model and a state dict) do not share an architecture."""


class SpecError(NeuralignError):
    """A permutation spec cannot be derived or does not fit the model."""
