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
