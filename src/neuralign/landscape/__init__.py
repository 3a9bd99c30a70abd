"""Loss landscape: interpolation curves, barriers, mode-connecting paths, surfaces, CKA, distances."""

from neuralign.landscape.curves import Curve, barrier, interpolation_curve

__all__ = ["Curve", "barrier", "interpolation_curve"]
