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

# issue 16: model stitching, layer-wise connectivity (Eq. 24) and G-CKA
from neuralign.landscape.layerwise import (
    LayerwiseResult,
    group_cka,
    layer_group_cka,
    partial_merge,
    partial_merge_barriers,
)
from neuralign.landscape.stitching import (
    StitchResult,
    plot_stitching,
    stitch,
    stitching_penalties,
)

__all__ += ["LayerwiseResult", "StitchResult", "group_cka", "layer_group_cka", "partial_merge",
            "partial_merge_barriers", "plot_stitching", "stitch", "stitching_penalties"]
