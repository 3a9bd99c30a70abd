"""Merging models: interpolation, BN reset, REPAIR, soups, Fisher, OT fusion, matched averaging, ZipIt."""

from neuralign.merge.api import METHODS, merge
from neuralign.merge.basic import average, interpolate, reset_bn, uniform_soup
from neuralign.merge.fisher import fisher_diagonal, fisher_merge
from neuralign.merge.matched import MatchedAveragingResult, matched_averaging
from neuralign.merge.ot import FusionResult, ot_fusion
from neuralign.merge.repair import repair
from neuralign.merge.soups import SoupResult, greedy_soup, learned_soup

__all__ = [
           "METHODS",
           "FusionResult",
           "MatchedAveragingResult",
           "SoupResult",
           "average",
           "fisher_diagonal",
           "fisher_merge",
           "greedy_soup",
           "interpolate",
           "learned_soup",
           "matched_averaging",
           "merge",
           "ot_fusion",
           "repair",
           "reset_bn",
           "uniform_soup",
]

# issue 16: the task-vector family and out-of-core merging of sharded checkpoints
from neuralign.merge.sharded import ShardedCheckpoint, merge_checkpoints, save_sharded
from neuralign.merge.sharded_match import permute_checkpoint, sharded_weight_matching
from neuralign.merge.task_vectors import (
    TASK_METHODS,
    add_task_vectors,
    align_then_merge,
    apply_task_vector,
    dare_merge,
    negate_task_vector,
    scale_task_vector,
    slerp,
    task_arithmetic,
    task_merge,
    task_vector,
    ties_merge,
)

__all__ += ["TASK_METHODS", "ShardedCheckpoint", "add_task_vectors", "align_then_merge",
            "apply_task_vector", "dare_merge", "merge_checkpoints", "negate_task_vector",
            "permute_checkpoint", "save_sharded", "scale_task_vector", "sharded_weight_matching",
            "slerp", "task_arithmetic", "task_merge", "task_vector", "ties_merge"]
