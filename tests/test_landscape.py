"""Tests for neuralign.landscape: barriers, curves, paths, CKA, distances, surfaces, plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.landscape import (
    Curve,
    autoneb,
    barrier,
    cka,
    filter_normalized_direction,
    fit_curve,
    interpolation_curve,
    kendall_tau_distance,
    layer_cka,
    loss_surface,
    per_block_l2,
    plane_surface,
)
from neuralign.merge._util import evaluate

torch.set_num_threads(1)


def mlp(seed=0, width=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU(), nn.Linear(width, 10)).eval()


@pytest.fixture(scope="module")
def digits():
    from neuralign.data import load_data

    return load_data("digits")


@pytest.fixture(scope="module")
def trained_pair(digits):
    from neuralign.train import train

    out = []
    for seed in (0, 1):
        m = mlp(seed, width=16)
        train(m, digits.loader("train", batch_size=64), epochs=6, lr=0.1, progress=False, seed=seed)
        out.append(m.eval())
    return out


def test_barrier_of_model_with_itself_is_zero(digits):
    a = mlp()
    c = interpolation_curve(a, a, digits.loader("val", batch_size=300), 5)
    for kind in ("loss", "accuracy"):
        for d in ("frankle", "entezari"):
            assert barrier(c, kind, d) == pytest.approx(0.0, abs=1e-6)


def test_barrier_definitions_eq2_eq7():
    c = Curve(t=[0, 0.25, 0.5, 0.75, 1.0], loss=[1.0, 2.5, 3.0, 3.5, 3.0], accuracy=[0.9, 0.5, 0.4, 0.6, 0.7])
    assert barrier(c, "loss", "frankle") == pytest.approx(3.5 - 2.0)  # max - mean(ends)
    assert barrier(c, "loss", "entezari") == pytest.approx(max(2.5 - 1.5, 3.0 - 2.0, 3.5 - 2.5))
    assert barrier(c, "accuracy", "frankle") == pytest.approx(0.8 - 0.4)
    assert barrier(c, "accuracy", "entezari") == pytest.approx(max(0.85 - 0.5, 0.8 - 0.4, 0.75 - 0.6))
    assert barrier({"t": [0, 1], "loss": [1.0, 2.0]}, "loss", "entezari") == pytest.approx(0.0)
    with pytest.raises(NeuralignError, match="definition"):
        barrier(c, "loss", "other")
    with pytest.raises(NeuralignError, match="no 'accuracy'"):
        barrier(Curve([0, 1], [1.0, 1.0]), "accuracy")


def test_interpolation_curve_endpoints_and_callable(digits, trained_pair):
    a, b = trained_pair
    val = digits.loader("val", batch_size=300)
    c = interpolation_curve(a, b, val, [0.0, 0.5, 1.0])
    assert c.loss[0] == pytest.approx(evaluate(a, val)["loss"], rel=1e-5)
    assert c.loss[2] == pytest.approx(evaluate(b, val)["loss"], rel=1e-5)
    c2 = interpolation_curve(a, b.state_dict(), lambda m: evaluate(m, val)["loss"], 3)
    assert c2.loss == pytest.approx(c.loss) and c2.accuracy is None


def test_cka_self_one_and_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g)
    y = torch.randn(64, 20, generator=g)
    p = torch.randperm(20, generator=g)
    for kernel in ("linear", "rbf"):
        assert cka(x, x, kernel) == pytest.approx(1.0, abs=1e-9)
        assert cka(x, x[:, p], kernel) == pytest.approx(1.0, abs=1e-6)
        assert cka(x, y, kernel) < 0.9
    assert cka(x, 3 * x + 1) == pytest.approx(1.0, abs=1e-9)


def test_layer_cka_matrix_against_permuted_copy(digits):
    from neuralign.permute import apply_permutation, random_permutation
    from neuralign.spec import spec_from_model

    a = mlp(0)
    x = torch.randn(2, 1, 8, 8)
    spec = spec_from_model(a, x)
    b = apply_permutation(a, random_permutation(spec, seed=3), spec)
    m, la, _ = layer_cka(a, b, digits.loader("val", batch_size=100), layers_a=["1", "3", "5"],
                          layers_b=["1", "3", "5"], n_examples=150)
    assert m.shape == (3, 3) and la == ["1", "3", "5"]
    assert torch.allclose(torch.diag(m), torch.ones(3), atol=1e-5)
    with pytest.raises(NeuralignError, match="no module"):
        layer_cka(a, b, digits.loader("val"), layers_a=["nope"])


def test_bezier_lowers_mid_path_loss(digits, trained_pair):
    a, b = trained_pair
    train = digits.loader("train", batch_size=64)
    line = interpolation_curve(a, b, train, 5)
    for kind in ("bezier", "polychain"):
        path = fit_curve(a, b, train, kind=kind, epochs=6, lr=0.05, seed=0)
        curve = path.evaluate(train, 5)
        assert curve.loss[0] == pytest.approx(line.loss[0], rel=1e-4)
        assert curve.loss[2] < line.loss[2] - 0.05
        assert max(curve.loss) < max(line.loss)


def test_autoneb_inserts_pivots_and_lowers_path(digits, trained_pair):
    a, b = trained_pair
    train = digits.loader("train", batch_size=64)
    path = autoneb(a, b, train, n_pivots=2, rounds=2, steps=30, lr=0.05, seed=0)
    assert len(path.points) > 4  # one pivot inserted after the first round
    line = interpolation_curve(a, b, train, 9)
    assert max(path.evaluate(train, 9).loss) < max(line.loss)


def test_kendall_tau_and_per_block_l2():
    assert kendall_tau_distance(torch.arange(10)) == 0.0
    assert kendall_tau_distance(torch.arange(9, -1, -1)) == 1.0
    assert kendall_tau_distance({"g": torch.tensor([1, 0, 2])}) == {"g": pytest.approx(1 / 3)}
    with pytest.raises(NeuralignError, match="permutation"):
        kendall_tau_distance(torch.tensor([0, 0, 1]))
    a, b = mlp(0), mlp(1)
    d = per_block_l2(a, a)
    assert set(d) == {"1", "3", "5"} and all(v == 0 for v in d.values())
    d = per_block_l2(a, b, relative=True)
    assert all(v > 0.5 for v in d.values())


def test_filter_normalized_surfaces(digits, tmp_path):
    from neuralign.landscape.plots import plot_cka, plot_curves, plot_surface

    a = mlp(0)
    d = filter_normalized_direction(a, seed=0)
    assert torch.allclose(d["1.weight"].norm(dim=1), a[1].weight.norm(dim=1), rtol=1e-4)
    assert torch.count_nonzero(d["1.bias"]) == 0
    val = digits.loader("val", batch_size=300)
    s1 = loss_surface(a, val, dims=1, steps=3, span=0.5)
    assert s1.loss.shape == (3,) and s1.loss[1] == pytest.approx(evaluate(a, val)["loss"], rel=1e-5)
    s2 = loss_surface(a, val, dims=2, steps=3)
    assert s2.loss.shape == (3, 3)
    pl = plane_surface(a, mlp(1), mlp(2), val, steps=3)
    assert pl.points["A"] == (0.0, 0.0) and pl.points["B"][0] > 0 and pl.loss.shape == (3, 3)
    for f in (plot_surface(s2, tmp_path / "s.png"), plot_surface(s1, tmp_path / "s1.png"),
              plot_cka(torch.eye(2), ["a", "b"], ["c", "d"], tmp_path / "c.png"),
              plot_curves({"x": Curve([0, 1], [1.0, 2.0])}, tmp_path / "k.png")):
        assert f.exists() and f.stat().st_size > 1000
