import gzip

import numpy as np
import pytest
import torch

from neuralign.data import (load_data, load_digits, load_domains, load_fashion_mnist,
                            load_mnist1d, make_loader)
from neuralign.errors import DataError


def test_digits_shapes_classes_and_determinism(digits):
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    x, y = digits.train.tensors
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert set(y.tolist()) == set(range(10))
    again = load_digits(data_seed=0)
    assert torch.equal(again.val.tensors[0], digits.val.tensors[0])
    other = load_digits(data_seed=1)
    assert not torch.equal(other.val.tensors[1], digits.val.tensors[1])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_loader_order_is_seeded(digits):
    a = [y for _, y in make_loader(digits.train, 64, shuffle=True, seed=3)]
    b = [y for _, y in make_loader(digits.train, 64, shuffle=True, seed=3)]
    c = [y for _, y in make_loader(digits.train, 64, shuffle=True, seed=4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_fashion_mnist_shapes_and_splits(fashion_root):
    s = load_fashion_mnist(data_seed=0, subset=2000, test_subset=1000)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.train.tensors[0].shape == (2000, 1, 28, 28)
    assert len(s.val) == 5000 and len(s.test) == 1000
    assert torch.bincount(s.train.tensors[1]).tolist() == [200] * 10
    s2 = load_fashion_mnist(data_seed=0, subset=2000, test_subset=1000)
    assert torch.equal(s.train.tensors[1], s2.train.tensors[1])
    full = load_data("fashion-mnist")
    assert len(full.train) == 55000 and len(full.test) == 10000


def test_fashion_mnist_missing_path_says_what_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path / "nowhere")
    with pytest.raises(DataError, match="not found in"):
        load_fashion_mnist(root=tmp_path)


def test_fashion_mnist_env_variable_and_truncated_file(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        with gzip.open(folder / f"{stem}.gz", "wb") as f:
            f.write(header + bytes(100))  # far fewer than 10*28*28 bytes
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(folder / f"{stem}.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(10))
    monkeypatch.setenv("NEURALIGN_DATA", str(tmp_path))
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist()


def test_mnist1d_is_generated_not_downloaded():
    s = load_mnist1d(data_seed=0, num_samples=1000)
    assert s.input_shape == (1, 40) and s.num_classes == 10
    assert s.train.tensors[0].shape[1:] == (1, 40)
    again = load_mnist1d(data_seed=0, num_samples=1000)
    assert torch.equal(s.train.tensors[0], again.train.tensors[0])


def test_unknown_dataset_names_the_choices():
    with pytest.raises(DataError, match="digits"):
        load_data("cifar10")


def _make_domains(root, domains=("art", "photo", "sketch"), classes=("cat", "dog"), n=5):
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, size=(12, 12, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / d / c / f"{i}.jpg")


def test_domainbed_leave_one_domain_out(tmp_path):
    _make_domains(tmp_path)
    s = load_domains(tmp_path, "sketch", image_size=16, val_fraction=0.2, seed=0)
    assert s.classes == ["cat", "dog"] and s.source_domains == ["art", "photo"]
    assert len(s.test) == 10 and len(s.train) + len(s.val) == 20 and len(s.val) == 4
    x, y = s.train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    with pytest.raises(DataError, match="test domain 'clipart' not in"):
        load_domains(tmp_path, "clipart")
    with pytest.raises(DataError, match="does not exist"):
        load_domains(tmp_path / "missing", "art")
