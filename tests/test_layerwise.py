"""Layer-wise connectivity (Eq. 24) and CKA restricted to the ReLU symmetry group."""

from __future__ import annotations

import pytest
import torch

from neuralign.align.scaling import apply_scaling
from neuralign.errors import NeuralignError
from neuralign.landscape import barrier, cka, interpolation_curve
from neuralign.landscape.layerwise import (
    group_cka,
    layer_group_cka,
    partial_merge,
    partial_merge_barriers,
)
from neuralign.models.reference import MLP
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

torch.set_num_threads(1)


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3] + 0.5 * x[:, 3:6]).argmax(1)
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


def mlp(seed, norm="none"):
    torch.manual_seed(seed)
    return MLP(in_features=8, num_classes=3, width=12, depth=3, norm=norm).eval()


LAYERS = ["layer1", "layer2", "layer3", "classifier"]


@pytest.mark.parametrize("kind", ["loss", "accuracy"])
def test_last_layer_equals_the_ordinary_barrier(kind):
    a, b, loader = mlp(0), mlp(1), data()
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    res = partial_merge_barriers(a, b, loader, layers=LAYERS, ts=ts, kind=kind)
    ref = barrier(interpolation_curve(a, b, loader, ts), kind=kind, definition="entezari")
    assert res.barriers[-1] == pytest.approx(ref, abs=1e-6)
    assert len(res.barriers) == 4 and len(res.curves[0]["head_a"]) == 5
    # partial merge through layer 0 keeps a's later layers
    m = partial_merge(a, b, LAYERS, 0, 0.5, "a")
    assert torch.equal(m.layer2[0].weight, a.layer2[0].weight)
    assert torch.allclose(m.layer1[0].weight, 0.5 * (a.layer1[0].weight + b.layer1[0].weight))


def test_identical_models_have_no_barrier_at_any_layer():
    a, loader = mlp(0, norm="bn"), data()
    res = partial_merge_barriers(a, a, loader, layers=LAYERS, ts=3, bn_loader=loader)
    assert max(abs(v) for v in res.barriers) < 1e-6


def test_bad_input():
    a, b, loader = mlp(0), mlp(1), data()
    with pytest.raises(NeuralignError, match="belongs to none"):
        partial_merge_barriers(a, b, loader, layers=["layer1"])
    with pytest.raises(NeuralignError, match="end points"):
        partial_merge_barriers(a, b, loader, layers=LAYERS, ts=[0.2, 1.0])


def test_group_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(200, 10, generator=g))
    perm = torch.randperm(10, generator=g)
    d = torch.exp(torch.randn(10, generator=g))
    y = x[:, perm] * d
    assert group_cka(x, y) == pytest.approx(1.0, abs=1e-9)
    z = torch.relu(torch.randn(200, 10, generator=g))
    assert group_cka(x, z) == pytest.approx(group_cka(x, z[:, perm] * d), abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    assert cka(x, x @ q) == pytest.approx(1.0, abs=1e-9)  # plain CKA: all rotations
    assert group_cka(x, x @ q) < 0.99  # restricted to the group: rotations are not symmetries
    assert group_cka(x, x @ q, group="orthogonal") == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(NeuralignError):
        group_cka(x, y, group="unknown")


def test_layer_group_cka_of_a_rescaled_permuted_copy_is_one():
    a, loader = mlp(0), data()
    x = loader[0][0]
    spec = spec_from_model(a, x[:2])
    scales = {n: torch.exp(torch.randn(spec.groups[n].size, dtype=torch.float64))
              for n in spec.groups}
    b = apply_scaling(apply_permutation(a, random_permutation(spec, 2), spec), scales, spec)
    vals = layer_group_cka(a, b, loader, layers=["layer1", "layer2", "layer3"])
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in vals.values())
    other = layer_group_cka(a, mlp(1), loader, layers=["layer1", "layer2", "layer3"])
    assert all(v < 0.999 for v in other.values())
