"""Finding permutations that align one model to another."""

from neuralign.align.weight import solve_lap, weight_matching, weight_objective
from neuralign.permute import random_permutation
from neuralign.spec.core import Permutation

__all__ = ["Permutation", "weight_matching", "weight_objective", "random_permutation", "solve_lap"]
from neuralign.align.activation import activation_matching  # noqa: E402

__all__ += ["activation_matching"]
