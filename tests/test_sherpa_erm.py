"""SHERPA with a new head is ERM: permuting preserves the function and SGD is
permutation-equivariant, so after fine-tuning the logits agree to float rounding. The variants
that are not no-ops (head=anchor, lambda start) do change the result."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from neuralign.finetune import finetune
from neuralign.models import SmallCNN

KW = dict(lr=0.05, batch_size=16, progress=False, epochs=3, weight_decay=1e-4, num_classes=3)


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g) + 0.5 * y[:, None, None, None], y)


def _model(num_classes, seed):
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=num_classes, width=4)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def setup():
    d, test = _data(), _data(48, seed=9)
    m = _model(5, 0)  # a "pre-trained" model with another label set
    anchor = finetune(_model(5, 1), d, strategy="full", seed=100, **KW).model
    erm = {s: finetune(m, d, strategy="full", seed=s, **KW).model for s in (0, 1)}
    return d, test, m, anchor, erm


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("strategy", ["sherpa", "random_perm"])
def test_head_new_equals_erm_after_fine_tuning(setup, strategy, seed):
    d, test, m, anchor, erm = setup
    opts = {"anchor": anchor} if strategy == "sherpa" else {"perm_seed": 7}
    res = finetune(m, d, strategy=strategy, head="new", seed=seed, **KW, **opts)
    assert sum(res.info["permutation"].moved().values()) > 0  # the units did move
    assert max(res.info["kendall_tau"].values()) > 0
    x = test.tensors[0]
    a, b = _logits(res.model, x), _logits(erm[seed], x)
    assert (a - b).abs().max() < 1e-5, float((a - b).abs().max())
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert res.info["equivalent_to_erm"]


def test_head_anchor_and_lambda_start_are_not_no_ops(setup):
    d, test, m, anchor, erm = setup
    x = test.tensors[0]
    runs = {}
    for name, opts in (("anchor", {"head": "anchor"}), ("lam", {"head": "anchor", "lam": 0.5})):
        res = finetune(m, d, strategy="sherpa", anchor=anchor, seed=0, **KW, **opts)
        assert not res.info["equivalent_to_erm"]
        assert (_logits(res.model, x) - _logits(erm[0], x)).abs().max() > 1e-2
        runs[name] = res.model
    # the control of the head transplant: the anchor's head on randomly permuted features
    ctrl = finetune(m, d, strategy="random_perm", head="anchor", anchor=anchor, perm_seed=3,
                    seed=0, **KW)
    assert (_logits(ctrl.model, x) - _logits(erm[0], x)).abs().max() > 1e-2
    assert (_logits(ctrl.model, x) - _logits(runs["anchor"], x)).abs().max() > 1e-2
