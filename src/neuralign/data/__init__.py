"""Data: the embedded digits default, Fashion-MNIST, MNIST-1D, DomainBed-style domains and shift
generators."""

from neuralign.data.core import (
    Splits,
    fashion_mnist_root,
    load_data,
    load_digits,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    load_mnist1d,
    make_loader,
)
from neuralign.data.domainbed import DomainSplits, list_domains, load_domains
from neuralign.data.wordnet import TextSplits, load_wordnet, load_wordnet_task, wordnet_breeds

__all__ = [
    "Splits", "load_data", "load_digits", "load_fashion_mnist", "load_fashion_mnist_arrays",
    "load_mnist1d", "make_loader", "fashion_mnist_root", "DomainSplits", "list_domains",
    "load_domains", "TextSplits", "load_wordnet", "load_wordnet_task", "wordnet_breeds",
]
