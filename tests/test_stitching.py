"""Model stitching: identity stitch of a model with itself, penalty ordering, plot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuralign.errors import NeuralignError
from neuralign.landscape.stitching import plot_stitching, stitch, stitching_penalties
from neuralign.models.reference import MLP

torch.set_num_threads(1)


def task(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(100))
    y = (x @ w + 0.3 * torch.sin(3 * x[:, :4])).argmax(1)
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


def trained(seed, loader, steps=3):
    torch.manual_seed(seed)
    m = MLP(in_features=8, num_classes=4, width=16, depth=3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def models():
    loader = task()
    return trained(0, loader, 5), trained(1, loader, 5), loader, task(256, seed=1)


@pytest.mark.parametrize("kind", ["affine", "perm-scale"])
def test_identity_stitch_has_no_penalty(models, kind):
    a, _, loader, val = models
    before = {k: v.clone() for k, v in a.state_dict().items()}
    r0 = stitch(a, a, "layer2", loader, kind=kind, eval_loader=val, epochs=0)
    assert abs(r0.penalty) < 1e-9
    r1 = stitch(a, a, "layer2", loader, kind=kind, eval_loader=val, epochs=1, lr=1e-4)
    assert abs(r1.penalty) <= 0.01
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    assert r0.accuracy_a > 0.6


def test_rank_k_penalty_not_below_full_affine(models, tmp_path):
    a, b, loader, val = models
    res = stitching_penalties(a, b, loader, layers=["layer1", "layer2"],
                              kinds=("affine", "rank-1", "perm-scale"), eval_loader=val, epochs=2,
                              lr=3e-3)
    for i in range(2):
        assert res["penalty"]["affine"][i] <= res["penalty"]["rank-1"][i] + 1e-9
    assert max(res["penalty"]["rank-1"]) > 0.05  # a rank-1 bottleneck loses a 4-class task
    assert abs(res["penalty"]["affine"][0]) < 0.05
    path = plot_stitching(res, tmp_path / "stitch.png")
    assert path.exists() and path.stat().st_size > 0


def test_bad_input(models):
    a, b, loader, _ = models
    with pytest.raises(NeuralignError, match="unknown stitching kind"):
        stitch(a, b, "layer1", loader, kind="rank-x")
    with pytest.raises(NeuralignError, match="no layer"):
        stitch(a, b, "nope", loader)
    with pytest.raises(NeuralignError, match="exceeds"):
        stitch(a, b, "layer1", loader, kind="rank-99")


@pytest.mark.parametrize("kind", ["affine", "rank-2", "perm-scale"])
def test_conv_feature_maps_stitch_on_channels(kind):
    from neuralign.models.reference import SmallCNN

    torch.manual_seed(0)
    a = SmallCNN(in_channels=1, num_classes=3, width=4).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    loader = [(x, torch.randint(0, 3, (32,), generator=g))]
    r = stitch(a, a, "block1", loader, kind=kind, epochs=1, lr=1e-4)
    if kind != "rank-2":
        assert abs(r.penalty) <= 1 / 32 + 1e-9  # starts at the identity map of the channels
    assert r.model(x).shape == (32, 3)


def test_least_squares_start_reads_the_same_examples_from_a_shuffling_loader(models):
    """A shuffling loader gives another order on every pass: A's and B's activations for the
    least-squares start must come from one pass (else φ maps unrelated examples)."""
    from torch.utils.data import DataLoader, TensorDataset

    a, _, loader, ev = models
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    shuffled = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(0))
    r = stitch(a, a, "layer1", shuffled, kind="affine", eval_loader=ev, epochs=0, n_init=256)
    assert torch.allclose(r.model.phi.weight, torch.eye(16), atol=1e-4)
    assert r.penalty == pytest.approx(0.0, abs=1e-9)
