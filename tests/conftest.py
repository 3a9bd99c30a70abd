"""Shared fixtures. Tests are CPU-only and fast; optional extras are skipped when absent."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: the models under test are tiny, and extra threads only add overhead (or, on a
# busy machine, stall the suite).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from neuralign.data import load_digits

    return load_digits(data_seed=0)


@pytest.fixture(scope="session")
def fashion_root():
    from neuralign.data import fashion_mnist_root

    root = fashion_mnist_root()
    if not (root / "train-images-idx3-ubyte.gz").exists() and not (
            root / "train-images-idx3-ubyte").exists():
        pytest.skip(f"Fashion-MNIST files absent from {root} "
                    "(apt-get install -y dataset-fashion-mnist)")
    return root
