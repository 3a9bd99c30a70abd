"""TNA-PFN fixed neuron anchors: masks, bit-exact restoration, composition with the loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuralign.errors import NeuralignError
from neuralign.models import get_model
from neuralign.train import train
from neuralign.train.anchors import FixedNeuronAnchors, anchor_masks


def _data(n=96, d=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return get_model("mlp", in_features=16, width=24, depth=2, num_classes=4)


@pytest.mark.parametrize("optimizer,wd", [("sgd", 5e-2), ("adam", 1e-2)])
def test_fixed_weights_bit_identical_after_training(optimizer, wd):
    model = _mlp()
    init = copy.deepcopy(model.state_dict())
    anchors = FixedNeuronAnchors(model, ratio=0.4, seed=3)
    train(model, _data(), epochs=2, lr=0.1 if optimizer == "sgd" else 1e-2, optimizer=optimizer,
          momentum=0.9, weight_decay=wd, callbacks=[anchors], progress=False)
    after = model.state_dict()
    assert set(anchors.masks) == {"layer1.0.weight", "layer2.0.weight"}  # head excluded
    for name, mask in anchors.masks.items():
        assert mask.float().mean().item() == pytest.approx(0.4, abs=0.01)
        assert torch.equal(after[name][mask], init[name][mask])  # bit-exact
        assert not torch.equal(after[name][~mask], init[name][~mask])  # the rest trained
    assert anchors.check(model)
    assert not torch.equal(after["classifier.weight"], init["classifier.weight"])


def test_gradient_mask_only_is_not_enough_with_weight_decay():
    # Masking gradients alone lets weight decay move the fixed entries; restore() is needed.
    model = _mlp()
    anchors = FixedNeuronAnchors(model, ratio=0.5, seed=0)

    class GradMaskOnly:
        def after_backward(self, m, opt):
            anchors.mask_gradients(m)

    train(model, _data(), epochs=1, lr=0.1, weight_decay=0.1, callbacks=[GradMaskOnly()],
          progress=False)
    assert not anchors.check(model)


def test_same_seed_shares_mask_and_other_seed_does_not():
    a, b = _mlp(seed=0), _mlp(seed=1)  # different weights, same architecture
    ma = FixedNeuronAnchors(a, 0.3, seed=7).masks
    mb = FixedNeuronAnchors(b, 0.3, seed=7).masks
    mc = FixedNeuronAnchors(a, 0.3, seed=8).masks
    assert ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not all(torch.equal(ma[k], mc[k]) for k in ma)


def test_ratio_zero_equals_plain_training():
    m1, m2 = _mlp(), _mlp()
    anchors = FixedNeuronAnchors(m2, ratio=0.0, seed=0)
    assert anchors.num_fixed == 0
    kw = dict(epochs=2, lr=0.05, weight_decay=1e-3, progress=False, seed=0)
    train(m1, _data(), **kw)
    train(m2, _data(), callbacks=[anchors], **kw)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_neuron_granularity_head_ratio_and_pruning_fill():
    model = _mlp()
    anchors = FixedNeuronAnchors(model, ratio=0.25, head_ratio=0.5, granularity="neuron",
                                 seed=1)
    w = anchors.masks["layer1.0.weight"]
    rows = w.all(dim=1)
    assert torch.equal(rows, w.any(dim=1))  # whole rows
    assert int(rows.sum()) == 6  # round(0.25 * 24)
    assert "classifier.weight" in anchors.masks  # rho_v of the theorem
    pruned = FixedNeuronAnchors(model, ratio=0.5, fill=0.0, seed=1)
    out = pruned.apply(model)
    assert float(out.layer1[0].weight.detach()[pruned.masks["layer1.0.weight"]].abs().sum()) == 0
    assert float(model.layer1[0].weight.detach().abs().sum()) > 0  # input untouched


def test_first_k_epochs_only():
    model = _mlp()
    anchors = FixedNeuronAnchors(model, ratio=0.5, seed=0, epochs=1)
    train(model, _data(), epochs=3, lr=0.1, callbacks=[anchors], progress=False)
    assert not anchors.check(model)  # released after the first epoch, then trained


def test_conv_models_and_errors():
    model = get_model("resnet20", width=1, norm="bn", num_classes=10)
    anchors = FixedNeuronAnchors(model, 0.4, seed=0)
    assert "classifier.weight" not in anchors.masks
    assert all(m.ndim == 4 for m in anchors.masks.values())  # only conv kernels (no BN)
    same = anchor_masks(get_model("resnet20", width=1, norm="bn", num_classes=10), 0.4, seed=0)
    assert all(torch.equal(same[k], anchors.masks[k]) for k in same)
    with pytest.raises(NeuralignError, match="ratio"):
        FixedNeuronAnchors(model, 1.5)
    with pytest.raises(NeuralignError, match="does not fit"):
        anchors.restore(_mlp())
    with pytest.raises(NeuralignError, match="layers"):
        FixedNeuronAnchors(model, 0.4, layers="nope")


def test_works_with_torchvision_model():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=3)
    anchors = FixedNeuronAnchors(model, 0.2, seed=0)
    assert "fc.weight" not in anchors.masks and "conv1.weight" in anchors.masks
    x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        anchors.after_backward(model, opt)
        opt.step()
        anchors.after_step(model, opt)
    assert anchors.check(model)
