import pytest
import torch

from neuralign.errors import NeuralignError
from neuralign.models import get_model
from neuralign.train import evaluate, train


def test_same_seed_same_training(digits):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = get_model("mlp", width=32, depth=1)
        train(m, digits.train, epochs=1, lr=0.1, seed=5, progress=False, batch_size=64)
        runs.append(m.classifier.weight.clone())
    assert torch.equal(*runs)


def test_lr_scale_zero_freezes_a_group_and_callbacks_run(digits):
    torch.manual_seed(0)
    m = get_model("mlp", width=32, depth=2)
    frozen = m.layer1[0].weight.clone()
    seen = []

    class Spy:
        def on_epoch_start(self, model, opt, epoch):
            seen.append(("epoch", epoch))

        def after_step(self, model, opt):
            seen.append("step")

    groups = [{"params": m.layer1.parameters(), "lr_scale": 0.0},
              {"params": list(m.layer2.parameters()) + list(m.classifier.parameters())}]
    train(m, digits.loader("train", 256), epochs=2, lr=0.1, param_groups=groups,
          callbacks=[Spy()], progress=False, momentum=0.0)
    assert torch.equal(m.layer1[0].weight, frozen)
    assert seen.count("step") == 2 * 5 and ("epoch", 1) in seen


def test_regularizer_and_validation_metrics(digits):
    m = get_model("mlp", width=16, depth=1)
    hist = train(m, digits.loader("train"), epochs=2, lr=0.05, progress=False,
                 regularizer=lambda net: 0.0 * net.classifier.weight.sum(),
                 val_loader=digits.loader("val"))
    assert len(hist.epochs) == 2 and 0 <= hist.final["val_accuracy"] <= 1


def test_divergence_and_bad_options_are_named(digits):
    m = get_model("mlp", width=16, depth=1)
    with pytest.raises(NeuralignError, match="diverged"):
        train(m, digits.loader("train"), epochs=1, lr=1e9, progress=False)
    with pytest.raises(NeuralignError, match="optimizer must be"):
        train(m, digits.loader("train"), epochs=1, optimizer="lion", progress=False)


def test_evaluate_restores_mode(digits):
    m = get_model("mlp", width=16, depth=1).train()
    res = evaluate(m, digits.loader("test"))
    assert m.training and res["n"] == len(digits.test) and 0 <= res["accuracy"] <= 1
