"""Training and evaluation loops shared by everything; TNA-PFN fixed neuron anchors."""

from neuralign.train.loop import (
    History,
    as_loader,
    evaluate,
    iter_batches,
    make_optimizer,
    predict,
    train,
)

__all__ = ["History", "as_loader", "evaluate", "iter_batches", "make_optimizer", "predict", "train"]

try:  # TNA-PFN (issue 9) lives beside the loop
    from neuralign.train.anchors import FixedNeuronAnchors  # noqa: F401

    __all__.append("FixedNeuronAnchors")
except ImportError:  # pragma: no cover - only while anchors.py is being written
    pass
