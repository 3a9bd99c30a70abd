"""Fashion-MNIST-C corruptions, BREEDS-style sub-population split and label flips."""

import pytest
import torch
from torch.utils.data import TensorDataset

from neuralign.data.corruptions import CORRUPTIONS, corrupt
from neuralign.data.label_shift import flip_dataset, flip_labels, permute_labels
from neuralign.data.subpopulation import (
    FASHION_SUPERCLASSES,
    relabel,
    split_subclasses,
    subpopulation_shift,
)
from neuralign.errors import DataError


def images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 28, 28)
    x[:, 6:22, 8:20] = 0.4 + 0.5 * torch.rand(n, 16, 12, generator=g)  # a garment on black
    return x


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_shape_range_determinism(name):
    x = images()
    y = corrupt(x, name, 5, seed=3)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(y, corrupt(x, name, 5, seed=3))
    assert float((y - x).abs().mean()) > 1e-3  # it changes the images
    assert torch.equal(x, images())  # input untouched
    y4 = corrupt(x[:, None], name, 1, seed=3)
    assert y4.shape == (6, 1, 28, 28)


@pytest.mark.parametrize("name", ["gaussian_noise", "gaussian_blur", "contrast", "pixelate",
                                  "jpeg_compression", "zoom_blur", "impulse_noise"])
def test_severity_increases_distortion(name):
    x = images(20)
    d = [float((corrupt(x, name, s, seed=0) - x).pow(2).mean()) for s in range(1, 6)]
    assert d[0] < d[2] < d[4]


def test_corruption_errors_name_the_problem():
    with pytest.raises(DataError, match="unknown corruption 'fog'"):
        corrupt(images(), "fog")
    with pytest.raises(DataError, match="severity"):
        corrupt(images(), "contrast", 6)
    with pytest.raises(DataError, match="float"):
        corrupt((images() * 255).to(torch.uint8), "contrast")
    with pytest.raises(DataError, match="grey"):
        corrupt(torch.rand(2, 3, 8, 8), "contrast")


def test_subpopulation_split_is_disjoint_and_covers_superclasses():
    src, tgt = split_subclasses(seed=1)
    assert not set(src) & set(tgt)
    assert set(src) | set(tgt) == {c for v in FASHION_SUPERCLASSES.values() for c in v}
    assert set(src.values()) == set(tgt.values()) == {0, 1, 2, 3}
    assert split_subclasses(seed=1) == (src, tgt)
    y = torch.arange(10).repeat(3)
    x = torch.arange(30).float()
    ds_src, ds_tgt = subpopulation_shift(TensorDataset(x, y), seed=1)
    assert len(ds_src) + len(ds_tgt) == 30
    xs, ys = relabel(x, y, src)
    assert all(src[int(c)] == int(s) for c, s in zip(y[xs.long()], ys))
    with pytest.raises(DataError, match="at least 2"):
        split_subclasses({"a": [0], "b": [1, 2]})
    with pytest.raises(DataError, match="repeats"):
        split_subclasses({"a": [0, 1], "b": [1, 2]})


def test_label_flip():
    y = torch.tensor([0, 3, 9])
    assert flip_labels(y, 10).tolist() == [9, 6, 0]
    assert torch.equal(flip_labels(flip_labels(y, 10), 10), y)
    assert flip_dataset(TensorDataset(torch.zeros(3, 2), y), 10).tensors[1].tolist() == [9, 6, 0]
    assert permute_labels(y, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]).tolist() == [9, 6, 0]
    with pytest.raises(DataError, match="lie in"):
        flip_labels(torch.tensor([10]), 10)
    with pytest.raises(DataError, match="permutation"):
        permute_labels(y, [0, 0, 1])
