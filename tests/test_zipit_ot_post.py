"""Issue 15 items 5 and 6: ZipIt matches post-activation features with its alpha (multi-way
merging) and beta (same-model budget) options; OT fusion's activation ground cost is taken on
post-activation outputs (as otfusion), the pre-activation cost kept as ``ground="preactivation"``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.merge import ot_fusion
from neuralign.merge.zipit import zip_features, zipit
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

torch.set_num_threads(1)


def two_unit_models():
    """Hidden units (pre-activation): A = (x1, x3); B = (x1 + 10, x1 + 0.3 x2).

    Before the ReLU, B's first unit is A's first unit shifted (correlation 1); after it, A's
    first unit is relu(x1) and B's first unit is still x1 + 10 (correlation ~0.86), while B's
    second unit relu(x1 + 0.3 x2) correlates ~0.95 with relu(x1). So matching pre-activations
    pairs A1 with B1, matching post-activations pairs A1 with B2."""
    def net(w, b):
        m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
        m[0].weight.data = torch.tensor(w)
        m[0].bias.data = torch.tensor(b)
        return m.eval()

    a = net([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [0.0, 0.0])
    b = net([[1.0, 0.0, 0.0], [1.0, 0.3, 0.0]], [10.0, 0.0])
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    return a, b, [(x[i:i + 1000], None) for i in range(0, 4000, 1000)]


def test_zipit_matches_post_activation_features():
    a, b, loader = two_unit_models()
    M = zipit([a, b], loader, within=False).merges[0]  # cross-model pairs only
    group_of_a1 = M[M[:, 0] > 0][0]
    assert group_of_a1[3] > 0 and group_of_a1[2] == 0  # A1 zipped with B2, not with B1


def test_ot_activation_cost_is_post_activation_and_preactivation_is_an_option():
    """Squared distances of the hidden units: before the ReLU, B1-A1 and B2-A2 are the cheaper
    pairing (by about 2x); after it, B1-A2 and B2-A1 (by about 1.5x)."""
    def net(w, b):
        m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
        m[0].weight.data, m[0].bias.data = torch.tensor(w), torch.tensor(b)
        return m.eval()

    a = net([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]], [1.0, 0.0])
    b = net([[-1.0, -2.0, 0.0], [-1.0, -2.0, -2.0]], [2.0, -2.0])
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    loader = [(x[i:i + 1000], None) for i in range(0, 4000, 1000)]
    # transports[model][layer]: (units of B, units of A), mass 1/2 per matched pair
    post = ot_fusion([a, b], ground="activation", loader=loader).transports[1][0]
    assert post[1, 0] == pytest.approx(0.5) and post[0, 1] == pytest.approx(0.5)
    pre = ot_fusion([a, b], ground="preactivation", loader=loader).transports[1][0]
    assert pre[0, 0] == pytest.approx(0.5) and pre[1, 1] == pytest.approx(0.5)
    for m in (a, b):  # an in-place ReLU does not overwrite the recorded pre-activations
        m[1] = nn.ReLU(inplace=True)
    pre = ot_fusion([a, b], ground="preactivation", loader=loader).transports[1][0]
    assert pre[0, 0] == pytest.approx(0.5) and pre[1, 1] == pytest.approx(0.5)


def _features(cols, rows=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 8, generator=g)
    return torch.stack([c(z, g) for c in cols], 1)


def _noise(z, g, s):
    return s * torch.randn(z.shape[0], generator=g)


def test_zipit_alpha_scales_the_correlation_of_merged_groups():
    # A = (z0, z1); B = (z0 + noise, 0.8 z0 + 0.6 z1): A0-B0 merge first (corr ~0.995); then the
    # group {A0, B0} correlates ~0.8 with B1 (times alpha) and A1 correlates 0.6 with B1.
    f = _features([lambda z, g: z[:, 0], lambda z, g: z[:, 1],
                   lambda z, g: z[:, 0] + _noise(z, g, 0.1), lambda z, g: 0.8 * z[:, 0] + 0.6 * z[:, 1]])

    def group_sizes(alpha):
        M, U = zip_features(f, 2, alpha=alpha, beta=0.0)
        assert torch.allclose(M.sum(1), torch.ones(M.shape[0], dtype=M.dtype))
        assert torch.equal(U.sum(1), torch.ones(4, dtype=U.dtype))  # every feature in one group
        return sorted(int(c) for c in (M > 0).sum(1))

    assert group_sizes(1.0) == [1, 3]  # 0.8 * 1.0 > 0.6: B1 joins the group, A1 stays alone
    assert group_sizes(0.5) == [2, 2]  # 0.8 * 0.5 < 0.6: B1 pairs with A1
    assert group_sizes(0.0) == [2, 2]  # no multi-way merges at all


def test_zipit_beta_is_a_same_model_budget():
    # model A has two near-duplicate pairs (corr ~0.999); model B's features are unrelated
    cols = [lambda z, g: z[:, 0], lambda z, g: z[:, 0] + _noise(z, g, 0.05),
            lambda z, g: z[:, 1], lambda z, g: z[:, 1] + _noise(z, g, 0.05)]
    cols += [lambda z, g, k=k: z[:, 2 + k] for k in range(4)]
    f = _features(cols)

    def groups_with_two_of_a(beta):
        M, _ = zip_features(f, 2, alpha=0.0, beta=beta)
        return int(((M[:, :4] > 0).sum(1) >= 2).sum())

    # budget per model: floor(beta * (8 - 4) / 2) same-model merges
    assert groups_with_two_of_a(1.0) == 2
    assert groups_with_two_of_a(0.5) == 1
    assert groups_with_two_of_a(0.0) == 0


def test_zipit_options_are_checked():
    a, b, loader = two_unit_models()
    for kw in ({"alpha": -0.1}, {"alpha": 1.5}, {"beta": 2.0}):
        with pytest.raises(NeuralignError, match="zipit"):
            zipit([a, b], loader, **kw)
    with pytest.raises(NeuralignError, match="two or more"):
        zipit([a], loader)


def _cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6), nn.MaxPool2d(2),
                      nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    for bn in (m[2], m[5]):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("opts", [{}, {"alpha": 0.0, "beta": 1.0}, {"alpha": 1.0, "beta": 0.5}])
def test_zipit_three_permuted_copies_give_the_model_back(opts):
    a = _cnn()
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    spec = spec_from_model(a, x[:2])
    b, c = (apply_permutation(a, random_permutation(spec, seed=s), spec).eval() for s in (1, 2))
    loader = [(x[:24], None), (x[24:], None)]
    res = zipit([a, b, c], loader, **opts)
    assert [m.shape for m in res.merges] == [(6, 18), (8, 24)]
    torch.testing.assert_close(res.model.eval()(x), a(x), rtol=1e-4, atol=1e-4)
    ens = zipit([a, b, _cnn(seed=5)], loader, stop_at=0).model.eval()
    torch.testing.assert_close(ens(x), (a(x) + b(x) + _cnn(seed=5)(x)) / 3, rtol=1e-4, atol=1e-5)
