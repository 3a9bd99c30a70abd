"""Issue 15 item 2: the layer chain behind ZipIt, matched averaging and OT fusion carries every
batch norm between two Conv/Linear layers, wherever it sits (conv-BN-ReLU or conv-ReLU-BN).

Property: merging a model with a permuted copy of itself gives the model back, for every
supported layer order, with and without bias, for each of the three methods.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.errors import ArchitectureMismatchError
from neuralign.merge import matched_averaging, ot_fusion
from neuralign.merge.zipit import zipit
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

torch.set_num_threads(1)


def _block(kind: str, order: str, c_in: int, c_out: int, bias: bool) -> list[nn.Module]:
    lin = nn.Linear(c_in, c_out, bias=bias) if kind == "linear" else \
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
    bn = nn.BatchNorm1d(c_out) if kind == "linear" else nn.BatchNorm2d(c_out)
    act = nn.ReLU()
    return {"bn-relu": [lin, bn, act], "relu-bn": [lin, act, bn], "relu": [lin, act],
            "relu-pool-bn": [lin, act, nn.MaxPool2d(2), bn]}[order]


def make(kind: str, order: str, bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        layers = [nn.Flatten(), *_block(kind, order, 16, 12, bias), *_block(kind, order, 12, 10, bias),
                  nn.Linear(10, 3)]
    else:
        second = "relu-bn" if order == "relu-pool-bn" else order
        layers = [*_block(kind, order, 1, 6, bias), *_block(kind, second, 6, 5, bias), nn.Flatten(),
                  nn.Linear(5 * (4 if order == "relu-pool-bn" else 16), 3)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():  # BN statistics and affine far from the identity
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = torch.randn(n, generator=g)
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


CASES = [("linear", o, b) for o in ("bn-relu", "relu-bn", "relu") for b in (True, False)] + \
        [("conv", o, b) for o in ("bn-relu", "relu-bn", "relu-pool-bn") for b in (True, False)]
IDS = [f"{k}-{o}-{'bias' if b else 'nobias'}" for k, o, b in CASES]


def inputs(seed=0):
    return torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def permuted(model, x, seed=1):
    spec = spec_from_model(model, x[:2])
    out = apply_permutation(model, random_permutation(spec, seed=seed), spec).eval()
    return out


@pytest.mark.parametrize(("kind", "order", "bias"), CASES, ids=IDS)
def test_merging_a_permuted_copy_gives_the_model_back(kind, order, bias):
    a = make(kind, order, bias)
    x = inputs()
    b = permuted(a, x)
    wa, wb = (next(p for p in m.parameters() if p.dim() > 1) for m in (a, b))
    assert not torch.allclose(wa, wb)  # a real permutation
    loader = [(x[:32], None), (x[32:], None)]
    ref = a(x)
    got = {
        "zipit": zipit([a, b], loader).model,
        "zipit(b, a)": zipit([b, a], loader).model,
        "matched(seed 0)": matched_averaging([a, b], seed=0).model,
        "matched(seed 1)": matched_averaging([a, b], seed=1).model,
        "ot weight": ot_fusion([a, b]).model,
        "ot activation": ot_fusion([a, b], ground="activation", loader=loader).model,
        "ot preactivation": ot_fusion([a, b], ground="preactivation", loader=loader).model,
    }
    for name, m in got.items():
        torch.testing.assert_close(m.eval()(x), ref, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(("kind", "order"), [("linear", "relu-bn"), ("conv", "relu-bn")])
def test_ot_fusion_merges_a_batch_norm_after_the_activation(kind, order):
    """All weight on model B: the fused model is B (transported to A's units), including the
    batch norm that follows the ReLU (it used to be A's, untouched)."""
    a, b = make(kind, order, True, seed=0), make(kind, order, True, seed=3)
    x = inputs()
    fused = ot_fusion([a, b], weights=[0.0, 1.0]).model.eval()
    torch.testing.assert_close(fused(x), b(x), rtol=1e-4, atol=1e-4)


def test_matched_averaging_weights_batch_norm_after_the_activation():
    a = make("linear", "relu-bn", True, seed=0)
    x = inputs()
    b = permuted(a, x, seed=2)
    res = matched_averaging([b, a, b], seed=0)
    torch.testing.assert_close(res.model.eval()(x), a(x), rtol=1e-4, atol=1e-4)


def test_the_inputs_are_left_as_they_were():
    a = make("conv", "relu-bn", True).train()
    x = inputs()
    b = permuted(a.eval(), x).train()
    a.train()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    zipit([a, b], [(x, None)])
    ot_fusion([a, b], ground="activation", loader=[(x, None)])
    matched_averaging([a, b])
    for m, sd in zip((a, b), before):
        assert all(mod.training for mod in m.modules())
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_a_norm_outside_the_hidden_layers_is_refused():
    for model in (nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)),
                  nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3),
                                nn.BatchNorm1d(3))):
        with pytest.raises(ArchitectureMismatchError, match="batch norm"):
            ot_fusion([model.eval(), model.eval()])


class _Transposed(nn.Module):
    """A chain with an operation between its layers that mixes units across positions."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)[:, :4]))
        return self.fc2(h.transpose(0, 1).contiguous().transpose(0, 1).roll(1, dims=1))


class _Functional(nn.Module):
    """The same chain written with torch functions instead of modules."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.c2(h)), 1)
        return self.fc(torch.flatten(h, 1))


def test_operations_between_layers_are_known_or_refused():
    with pytest.raises(ArchitectureMismatchError, match="not one the chain view knows"):
        ot_fusion([_Transposed().eval(), _Transposed().eval()])
    torch.manual_seed(0)
    a = _Functional().eval()
    x = inputs()
    b = permuted(a, x)
    for m in (zipit([a, b], [(x, None)]).model, ot_fusion([a, b]).model,
              matched_averaging([a, b], seed=1).model):
        torch.testing.assert_close(m.eval()(x), a(x), rtol=1e-4, atol=1e-4)

