"""LP-FT with a converged probe: an L2-regularised logistic regression picked on validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from neuralign.errors import NeuralignError
from neuralign.finetune import finetune
from neuralign.finetune.lpft import fit_logistic, head_features
from neuralign.models import SmallCNN

KW = dict(lr=0.05, batch_size=16, progress=False, num_classes=3)


def _data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) + y[:, None, None, None] * 0.7
    return TensorDataset(x, y)


def _model():
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=5, width=4)


def test_probe_is_converged_and_picked_on_validation():
    tr, va = _data(), _data(40, seed=1)
    res = finetune(_model(), tr, strategy="lp_ft", epochs=0, val_data=va, **KW)
    info = res.info
    assert info["probe"] == "lbfgs" and info["probe_selected_on"] == "val_data"
    accs = info["probe_val_accuracy"]
    assert info["probe_l2"] == max(accs, key=lambda k: (accs[k], k))
    assert info["probe_grad_norm"] < 1e-5
    # the head is the stationary point of the regularised objective on the frozen features
    x, y = head_features(res.model, tr)
    head = res.model.classifier
    w = head.weight.detach().double().requires_grad_(True)
    b = head.bias.detach().double().requires_grad_(True)
    loss = F.cross_entropy(x @ w.T + b, y) + info["probe_l2"] * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert float(torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())) < 1e-4
    # the body is untouched by probing
    base = _model().state_dict()
    for k, v in res.model.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(v, base[k]), k


def test_logistic_regression_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    l2 = 1e-2
    w, b, gnorm = fit_logistic(x, y, 3, l2)
    c = 1.0 / (2 * l2 * len(y))  # sklearn: 0.5 |w|^2 + C sum CE  <=>  l2 |w|^2 + mean CE
    ref = sk.LogisticRegression(C=c, tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
    p_ours = torch.softmax(x @ w.T + b, 1).numpy()
    assert gnorm < 1e-6
    assert abs(p_ours - ref.predict_proba(x.numpy())).max() < 1e-4


def test_without_validation_a_held_out_part_of_the_training_set_selects():
    res = finetune(_model(), _data(), strategy="lp_ft", epochs=1, **KW)
    assert res.info["probe_selected_on"].startswith("held-out")
    assert set(res.history) == {"lp", "ft"} and res.history["lp"] is None


def test_sgd_probe_and_bad_options():
    res = finetune(_model(), _data(), strategy="lp_ft", probe="sgd", lp_epochs=1, epochs=1, **KW)
    assert res.info["probe"] == "sgd" and res.info["lp_epochs"] == 1
    with pytest.raises(NeuralignError, match="probe='sgd'"):
        finetune(_model(), _data(), strategy="lp_ft", lp_epochs=2, epochs=1, **KW)
    with pytest.raises(NeuralignError, match="probe must be"):
        finetune(_model(), _data(), strategy="lp_ft", probe="closed", epochs=1, **KW)
