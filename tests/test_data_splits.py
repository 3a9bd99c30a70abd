"""The train/val/test split is the data's (``data_seed``), never the model's seed."""

import numpy as np
import pytest
import torch

from neuralign.data import load_data, load_fashion_mnist_arrays
from neuralign.data.core import FASHION_MEAN, FASHION_STD
from neuralign.errors import DataError
from neuralign.models import get_model
from neuralign.train import evaluate, train


def _rows(ds) -> set:
    return {tuple(np.round(r.flatten().numpy(), 5)) for r in ds.tensors[0]}


def test_two_models_trained_with_different_seeds_share_one_test_split():
    tests, trains = [], []
    for seed in (0, 1):  # how a user trains two models: the model seed varies, the data not
        data = load_data("digits")
        model = get_model("mlp", width=32, depth=1, image_size=8, seed=seed)
        train(model, data.loader("train", seed=seed), epochs=3, lr=0.05, progress=False)
        assert evaluate(model, data.loader("test"))["accuracy"] > 0.5
        tests.append(data.test)
        trains.append(data.train)
        assert data.data_seed == 0
    assert torch.equal(tests[0].tensors[0], tests[1].tensors[0])
    assert torch.equal(tests[0].tensors[1], tests[1].tensors[1])
    assert not _rows(tests[0]) & _rows(trains[1])  # no test image in the other's training set


def test_federated_runs_with_different_seeds_share_one_test_split():
    from neuralign.federated.task import FedTask

    a = FedTask(dataset="digits", num_partitions=2, model="mlp", seed=0).splits()
    b = FedTask(dataset="digits", num_partitions=2, model="mlp", seed=1).splits()
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    c = FedTask(dataset="digits", num_partitions=2, model="mlp", seed=0, data_seed=1).splits()
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_data_seed_draws_the_split_and_is_recorded():
    a, b = load_data("digits", data_seed=0), load_data("digits", data_seed=3)
    assert a.data_seed == 0 and b.data_seed == 3 and "data_seed=3" in repr(b)
    assert not torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.equal(a.test.tensors[0], load_data("digits").test.tensors[0])
    for s in (a, b):  # the three parts are disjoint
        tr, va, te = _rows(s.train), _rows(s.val), _rows(s.test)
        assert not (tr & te) and not (va & te)


def test_seed_is_a_deprecated_alias_of_data_seed():
    with pytest.warns(FutureWarning, match="data_seed"):
        old = load_data("digits", seed=2)
    assert torch.equal(old.test.tensors[0], load_data("digits", data_seed=2).test.tensors[0])
    assert old.data_seed == 2
    with pytest.raises(DataError, match="disagree"), pytest.warns(FutureWarning):
        load_data("digits", seed=2, data_seed=3)


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_bad_data_seed_is_a_one_line_error(bad):
    with pytest.raises(DataError, match="data_seed must be an integer"):
        load_data("digits", data_seed=bad)


def test_subset_is_class_balanced_and_from_the_data_seed():
    s = load_data("digits", subset=200)
    assert len(s.train) == 200 and torch.bincount(s.train.tensors[1]).tolist() == [20] * 10
    assert torch.equal(s.test.tensors[0], load_data("digits").test.tensors[0])
    with pytest.raises(DataError, match="exceeds"):
        load_data("digits", subset=100_000)
    with pytest.raises(DataError, match="positive integer"):
        load_data("digits", subset=0)


def test_unknown_options_are_one_line_errors():
    with pytest.raises(DataError, match="bad option for data set 'digits'"):
        load_data("digits", nonsense=1)
    with pytest.raises(DataError, match="unknown data set"):
        load_data("cifar10")


def test_fashion_mnist_test_set_is_the_official_test_file(fashion_root):
    arr = load_fashion_mnist_arrays()
    expect = (arr["test_images"].astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD
    for data_seed in (0, 1):
        s = load_data("fashion_mnist", data_seed=data_seed, subset=500)
        assert len(s.test) == 10_000 and s.data_seed == data_seed
        assert torch.equal(s.test.tensors[0][:, 0], torch.from_numpy(expect))
        assert torch.equal(s.test.tensors[1], torch.from_numpy(arr["test_labels"].astype(
            np.int64)))
