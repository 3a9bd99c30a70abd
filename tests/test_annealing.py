"""Simulated annealing over permutations (Entezari et al.): seeded, never worse than the
identity, recovers a planted permutation on a tiny MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.align.annealing import annealing_matching
from neuralign.errors import NeuralignError
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

torch.set_num_threads(1)


def tiny(seed=0, width=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 2)).eval()


X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))


def output_loss(target):
    with torch.no_grad():
        y = target(X)

    def loss(model):
        with torch.no_grad():
            return float(((model(X) - y) ** 2).mean())
    return loss


def test_recovers_a_planted_permutation():
    a = tiny()
    with torch.no_grad():  # no unit dead on every input, so the planted permutation is unique
        a[0].bias.add_(1.0)
        a[2].bias.add_(1.0)
    spec = spec_from_model(a, X[:2])
    b = apply_permutation(a, random_permutation(spec, seed=5), spec)
    p = annealing_matching(spec, a, b, output_loss(a), steps=400, seed=0)
    assert p.info["barrier"] < 1e-10 < p.info["barrier_init"]
    aligned = apply_permutation(b, p, spec)
    for k, v in a.state_dict().items():
        assert torch.allclose(aligned.state_dict()[k], v), k


def test_seeded_and_never_worse_than_identity():
    a, b = tiny(0, 6), tiny(1, 6)
    spec = spec_from_model(a, X[:2])
    loss = output_loss(a)
    p1 = annealing_matching(spec, a, b, loss, steps=60, seed=3)
    p2 = annealing_matching(spec, a, b, loss, steps=60, seed=3)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert p1.info["history"] == p2.info["history"]
    assert p1.info["barrier"] <= p1.info["barrier_init"]
    assert all(x >= y for x, y in zip(p1.info["history"], p1.info["history"][1:]))
    # a bad starting permutation: the identity is still a candidate
    bad = random_permutation(spec, seed=9)
    p3 = annealing_matching(spec, a, b, loss, steps=1, seed=0, init=bad)
    ident = annealing_matching(spec, a, b, loss, steps=1, seed=0, t0=1e-12)
    assert p3.info["barrier"] <= ident.info["barrier_init"]
    # a data loader works too, and the time budget stops early
    y = torch.randint(0, 2, (64,))
    p4 = annealing_matching(spec, a, b, [(X, y)], steps=10_000, time_budget_s=0.2, seed=0)
    assert p4.info["steps"] < 10_000


def test_bad_input():
    a = tiny()
    spec = spec_from_model(a, X[:2])
    with pytest.raises(NeuralignError, match="ts"):
        annealing_matching(spec, a, a, output_loss(a), ts=(0.0, 0.5))
    with pytest.raises(NeuralignError, match="steps"):
        annealing_matching(spec, a, a, output_loss(a), steps=0)
    with pytest.raises(NeuralignError):
        annealing_matching(spec, a, tiny(width=5), output_loss(a))
