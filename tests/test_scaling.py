"""Matching modulo permutation × positive diagonal scaling (ReLU-family units)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.align.scaling import (
    apply_scaling,
    canonicalize,
    scalable_groups,
    scaling_matching,
)
from neuralign.align.weight import weight_matching
from neuralign.errors import NeuralignError
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

torch.set_num_threads(1)
X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))


def relu_mlp(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), act(), nn.Linear(10, 12), act(),
                         nn.Linear(12, 3)).eval()


def random_scaling(spec, groups, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.exp(torch.empty(spec.groups[n].size, dtype=torch.float64)
                         .uniform_(-2, 2, generator=g)) for n in groups}


@pytest.mark.parametrize("act", [nn.ReLU, lambda: nn.LeakyReLU(0.1)])
def test_random_scaling_and_permutation_is_recovered(act):
    a = relu_mlp(act=act)
    spec = spec_from_model(a, X[:2])
    groups, _ = scalable_groups(a, spec, X)
    assert len(groups) == 2
    # b = D P a: the same function, far from a in weight space
    b = apply_scaling(apply_permutation(a, random_permutation(spec, seed=4), spec),
                      random_scaling(spec, groups, 7), spec)
    assert torch.allclose(b(X), a(X), atol=1e-5)
    res = scaling_matching(spec, a, b, X)
    with torch.no_grad():
        assert (res.aligned(X) - b(X)).abs().max() < 1e-5  # function preserved
    for k, v in a.state_dict().items():
        assert (res.aligned.state_dict()[k] - v).abs().max() < 1e-5, k
    assert all(bool((s > 0).all()) for s in res.scales.values())
    # plain weight matching cannot undo the scaling
    p = weight_matching(spec, a, b)
    wm = apply_permutation(b, p, spec)
    assert max((wm.state_dict()[k] - v).abs().max() for k, v in a.state_dict().items()) > 0.1


def test_trained_like_models_and_canonical_form():
    a, b = relu_mlp(0), relu_mlp(1)
    spec = spec_from_model(a, X[:2])
    before = {k: v.clone() for k, v in b.state_dict().items()}
    res = scaling_matching(spec, a, b, X)
    with torch.no_grad():
        assert (res.aligned(X) - b(X)).abs().max() < 1e-5
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # not mutated
    can, _ = canonicalize(a, spec, [next(iter(spec.groups))])
    w = can.state_dict()["0.weight"]
    bias = can.state_dict()["0.bias"]
    assert torch.allclose((w.pow(2).sum(1) + bias.pow(2)).sqrt(), torch.ones(10), atol=1e-6)


def test_non_homogeneous_units_are_not_scaled():
    a = relu_mlp(act=nn.Tanh)
    spec = spec_from_model(a, X[:2])
    a.train()
    groups, why = scalable_groups(a, spec, X)
    assert a.training  # the mode is restored
    assert groups == [] and all("scaling changes" in r for r in why.values())
    with pytest.raises(NeuralignError, match="positive"):
        apply_scaling(a, {next(iter(spec.groups)): -torch.ones(10)}, spec)
