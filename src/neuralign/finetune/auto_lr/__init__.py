"""Automatic per-layer fine-tuning (Agarwala et al., "Automatic fine-tuning"; Lee et al.'s
Auto-RGN / Auto-SNR): scores that pick a learning-rate weight per layer, and the strategies
``auto_rgn``, ``auto_snr`` (Lee's 0/1 mask), ``auto_snr_scaled``, ``auto_rgn_hessian``,
``auto_rgn_change``, ``auto_rgn_hessian_change``, ``layerwise_surprise``, ``layerwise_surprise_diff``,
``module_criticality`` and ``cross_validation`` registered in ``neuralign.finetune``.
"""

from neuralign.finetune.auto_lr.criticality import (
    criticality_scores,
    identity_removal_,
    random_removal_,
    remove_module,
    top_k_weights,
)
from neuralign.finetune.auto_lr.grad_scores import (
    gradient_weights,
    per_example_gradients,
    rgn_scores,
    snr_scores,
)
from neuralign.finetune.auto_lr.layers import (
    Layer,
    model_layers,
    normalise_scores,
    param_groups_from_weights,
    set_group_scales,
)
from neuralign.finetune.auto_lr.lbfgs import lbfgs_pairs, preconditioned_gradient, two_loop
from neuralign.finetune.auto_lr.plots import plot_layer_weights, save_layer_weights
from neuralign.finetune.auto_lr.strategies import (
    AutoRGN,
    AutoRGNChange,
    AutoRGNHessian,
    AutoRGNHessianChange,
    AutoSNR,
    AutoSNRScaled,
    CrossValidation,
    LayerwiseSurprise,
    LayerwiseSurpriseDiff,
    ModuleCriticality,
)
from neuralign.finetune.auto_lr.surprise import module_surprise, surprise_scores

__all__ = [
    "AutoRGN",
    "AutoRGNChange",
    "AutoRGNHessian",
    "AutoRGNHessianChange",
    "AutoSNR",
    "AutoSNRScaled",
    "CrossValidation",
    "Layer",
    "LayerwiseSurprise",
    "LayerwiseSurpriseDiff",
    "ModuleCriticality",
    "criticality_scores",
    "gradient_weights",
    "identity_removal_",
    "lbfgs_pairs",
    "model_layers",
    "module_surprise",
    "normalise_scores",
    "param_groups_from_weights",
    "per_example_gradients",
    "plot_layer_weights",
    "preconditioned_gradient",
    "random_removal_",
    "remove_module",
    "rgn_scores",
    "save_layer_weights",
    "set_group_scales",
    "snr_scores",
    "surprise_scores",
    "top_k_weights",
    "two_loop",
]
