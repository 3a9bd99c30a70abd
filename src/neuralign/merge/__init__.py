"""Merging models: interpolation, BN reset, REPAIR, soups, Fisher, OT fusion, matched averaging, ZipIt.

The names below are imported on first use (PEP 562): ``import neuralign.merge.sharded`` for an
out-of-core merge then does not pull in optimal transport, scikit-learn and SciPy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "api": ["METHODS", "merge"],
    "basic": ["average", "interpolate", "reset_bn", "uniform_soup"],
    "fisher": ["fisher_diagonal", "fisher_merge"],
    "matched": ["MatchedAveragingResult", "matched_averaging"],
    "ot": ["FusionResult", "ot_fusion"],
    "repair": ["repair"],
    "soups": ["SoupResult", "greedy_soup", "learned_soup"],
    # issue 16: the task-vector family and out-of-core merging of sharded checkpoints
    "sharded": ["ShardedCheckpoint", "merge_checkpoints", "save_sharded"],
    "sharded_match": ["permute_checkpoint", "sharded_weight_matching"],
    "task_vectors": ["TASK_METHODS", "add_task_vectors", "align_then_merge", "apply_task_vector",
                     "dare_merge", "negate_task_vector", "scale_task_vector", "slerp",
                     "task_arithmetic", "task_merge", "task_vector", "ties_merge"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
# ``repair`` is also a submodule's name: bound now, or importing ``neuralign.merge.repair``
# first would leave the package attribute the module instead of the function
from neuralign.merge.repair import repair  # noqa: E402

__all__ = [
    "METHODS",
    "TASK_METHODS",
    "FusionResult",
    "MatchedAveragingResult",
    "ShardedCheckpoint",
    "SoupResult",
    "add_task_vectors",
    "align_then_merge",
    "apply_task_vector",
    "average",
    "dare_merge",
    "fisher_diagonal",
    "fisher_merge",
    "greedy_soup",
    "interpolate",
    "learned_soup",
    "matched_averaging",
    "merge",
    "merge_checkpoints",
    "negate_task_vector",
    "ot_fusion",
    "permute_checkpoint",
    "repair",
    "reset_bn",
    "save_sharded",
    "scale_task_vector",
    "sharded_weight_matching",
    "slerp",
    "task_arithmetic",
    "task_merge",
    "task_vector",
    "ties_merge",
    "uniform_soup",
]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'neuralign.merge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"neuralign.merge.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
