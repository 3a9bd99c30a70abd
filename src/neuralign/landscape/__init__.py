"""Loss landscape: interpolation curves, barriers, mode-connecting paths, surfaces, CKA, distances."""

from neuralign.landscape.analysis import (
           cka,
           features,
           kendall_tau_distance,
           layer_cka,
           per_block_l2,
)
from neuralign.landscape.curves import Curve, barrier, interpolation_curve
from neuralign.landscape.paths import Path, autoneb, fit_curve
from neuralign.landscape.surface import (
           Surface,
           filter_normalized_direction,
           loss_surface,
           plane_surface,
)

__all__ = [
           "Curve",
           "Path",
           "Surface",
           "autoneb",
           "barrier",
           "cka",
           "features",
           "filter_normalized_direction",
           "fit_curve",
           "interpolation_curve",
           "kendall_tau_distance",
           "layer_cka",
           "loss_surface",
           "per_block_l2",
           "plane_surface",
]
