"""Finding permutations that align one model to another (each result, applied to ``b`` with
:func:`neuralign.permute.apply_permutation`, aligns it to ``a``)."""

from neuralign.align.activation import ActivationStats, activation_matching, activation_statistics
from neuralign.align.api import METHODS, align_models, l2_distance
from neuralign.align.many import align_many, align_to_mean
from neuralign.align.sinkhorn import sinkhorn_matching
from neuralign.align.ste import ste_matching
from neuralign.align.weight import solve_lap, weight_matching, weight_objective
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec.core import Permutation

__all__ = [
           "METHODS",
           "ActivationStats",
           "Permutation",
           "activation_matching",
           "activation_statistics",
           "align_many",
           "align_models",
           "align_to_mean",
           "apply_permutation",
           "l2_distance",
           "random_permutation",
           "sinkhorn_matching",
           "solve_lap",
           "ste_matching",
           "weight_matching",
           "weight_objective",
]

# issue 16: simulated annealing (Entezari et al.) and matching modulo permutation x scaling
from neuralign.align.annealing import annealing_matching
from neuralign.align.scaling import (
    ScaledAlignment,
    apply_scaling,
    canonicalize,
    scalable_groups,
    scaling_matching,
)

__all__ += ["ScaledAlignment", "annealing_matching", "apply_scaling", "canonicalize",
            "scalable_groups", "scaling_matching"]
