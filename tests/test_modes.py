"""Functions that run a caller's model in eval mode give every module its own mode back: a
model in train mode with a batch norm frozen in eval mode (as fine-tuning recipes freeze them)
keeps that batch norm frozen. Restoring only the top-level flag (``model.train(was)``) switched
it back to train mode, so its statistics drifted in the caller's next training step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from neuralign.align import activation_matching, activation_statistics
from neuralign.evaluation import predict
from neuralign.landscape import layer_cka
from neuralign.merge import repair
from neuralign.models import get_model
from neuralign.spec import check_spec, spec_from_model
from neuralign.train import evaluate

X = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
LOADER = DataLoader(TensorDataset(X, Y), batch_size=16)


def _mixed(seed):
    m = get_model("resnet20", width=1, norm="bn", num_classes=10, in_channels=1, image_size=28,
                  seed=seed).train()
    m.layer1[0].norm1.eval()  # frozen
    return m


def _spec():
    return spec_from_model(_mixed(0), X[:2])


CALLS = {
    "evaluate": lambda a, b: evaluate(a, LOADER),
    "predict": lambda a, b: predict(a, LOADER),
    "spec_from_model": lambda a, b: spec_from_model(a, X[:2]),
    "check_spec": lambda a, b: check_spec(a, _spec(), X[:2]),
    "activation_statistics": lambda a, b: activation_statistics(a, b, LOADER, _spec()),
    "activation_matching": lambda a, b: activation_matching(a, b, LOADER, spec=_spec()),
    "repair": lambda a, b: repair(a, b, _mixed(2), LOADER),
    "layer_cka": lambda a, b: layer_cka(a, b, LOADER, n_examples=32),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_frozen_batch_norm_stays_frozen(name):
    a, b = _mixed(0), _mixed(1)
    modes = {m: [x.training for x in m.modules()] for m in (a, b)}
    CALLS[name](a, b)
    for m in (a, b):
        assert [x.training for x in m.modules()] == modes[m]
