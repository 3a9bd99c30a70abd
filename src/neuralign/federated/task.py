"""What a federated run trains on: data set, partitioning, model and local-training settings.

A ``FedTask`` travels as Flower's run config (flat ``key -> scalar``), so the same ClientApp
code finds its data on the simulation engine, on the in-process grid and on real SuperNodes
(where ``partition-id`` / ``num-partitions`` come from the SuperNode's node config).

``client_data`` says where a client's training data comes from: ``"partition"`` (its Dirichlet
partition of the built-in data set: the simulation's convenience, every node needs the whole set)
or ``"node"`` (the node's own ``.npz`` file, ``data-path`` in its node config; see
:mod:`neuralign.federated.node_data`). ``input_shape`` / ``num_classes`` let a node build the
model without loading any data set; :meth:`FedTask.with_data_shape` fills them in.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from neuralign.data import load_data, make_loader
from neuralign.errors import NeuralignError
from neuralign.federated.partition import dirichlet_partition
from neuralign.models import get_model


@dataclasses.dataclass(frozen=True)
class FedTask:
    """Settings shared by the server and every client of one federated run."""

    dataset: str = "fashion_mnist"
    subset: int = 0               # class-balanced training subset (0: all); fashion_mnist only
    test_subset: int = 0          # test subset for the server's evaluation (0: all)
    data_root: str = ""           # Fashion-MNIST IDX directory ("" : the default location)
    num_partitions: int = 10
    alpha: float = 0.1            # Dirichlet concentration of the label partition
    min_partition_size: int = 10
    model: str = "lenet"          # "lenet" (federated/models.py) or any get_model name
    model_kwargs: str = "{}"      # JSON, passed to the model's constructor
    seed: int = 0                 # model initialisation, partition and client data order
    data_seed: int = 0            # the train/val/test split (never the model's seed)
    batch_size: int = 32
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    fail_partitions: str = ""     # comma-separated partition ids whose client raises (tests)
    output: str = ""              # where the ServerApp writes its JSON history ("" : nowhere)
    client_data: str = "partition"  # "partition" (of the built-in set) or "node" (data-path)
    input_shape: str = ""         # "C,H,W" of the model's input ("" : from the data set)
    num_classes: int = 0          # classes of the model's output (0 : from the data set)

    # -- run config round trip ---------------------------------------------------------------
    def to_run_config(self) -> dict:
        """``task.*`` keys; the fields added for node-local data are left out at their
        defaults, so run configs (and caches keyed by them) of earlier runs stay the same."""
        return {f"task.{k.replace('_', '-')}": v for k, v in dataclasses.asdict(self).items()
                if not (k in _OPTIONAL and v == _OPTIONAL[k])}

    @classmethod
    def from_run_config(cls, cfg) -> FedTask:
        kw = {}
        for f in dataclasses.fields(cls):
            key = f"task.{f.name.replace('_', '-')}"
            if key in cfg:
                kw[f.name] = type(f.default)(cfg[key])
        return cls(**kw)

    # -- data --------------------------------------------------------------------------------
    def splits(self):
        return _splits(self.dataset, self.subset, self.test_subset, self.data_root,
                       self.data_seed)

    def partitions(self) -> list[np.ndarray]:
        return _partitions(self.dataset, self.subset, self.test_subset, self.data_root,
                           self.data_seed, self.seed, self.num_partitions, self.alpha,
                           self.min_partition_size)

    def with_data_shape(self) -> FedTask:
        """This task with ``input_shape`` / ``num_classes`` read from the data set, so that
        nodes with their own data build the model without the data set."""
        if self.input_shape and self.num_classes:
            return self
        sp = self.splits()
        return dataclasses.replace(self, input_shape=",".join(map(str, sp.input_shape)),
                                   num_classes=int(sp.num_classes))

    def model_io(self) -> tuple[tuple[int, ...], int]:
        if self.input_shape and self.num_classes:
            return tuple(int(v) for v in self.input_shape.split(",")), int(self.num_classes)
        sp = self.splits()
        return tuple(sp.input_shape), int(sp.num_classes)

    def node_loader(self, data_path: str, server_round: int = 0, node_seed: int = 0):
        """The loader of a node's own data file (``client_data="node"``)."""
        from neuralign.federated.node_data import load_node_data

        shape, classes = self.model_io() if self.input_shape else (None, None)
        ds = load_node_data(data_path, input_shape=shape, num_classes=classes)
        return make_loader(ds, self.batch_size, shuffle=True,
                           seed=self.seed * 100_003 + node_seed * 1009 + server_round)

    def client_loader(self, partition_id: int, server_round: int = 0):
        if not 0 <= partition_id < self.num_partitions:
            raise NeuralignError(f"partition-id {partition_id} is outside "
                                 f"[0, {self.num_partitions})")
        idx = self.partitions()[partition_id]
        ds = Subset(self.splits().train, idx.tolist())
        return make_loader(ds, self.batch_size, shuffle=True,
                           seed=self.seed * 100_003 + partition_id * 1009 + server_round)

    def test_loader(self):
        return make_loader(self.splits().test, batch_size=512)

    # -- model -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The initial global model (seeded: every party builds the same one)."""
        shape, num_classes = self.model_io()
        kwargs = json.loads(self.model_kwargs) if self.model_kwargs else {}
        torch.manual_seed(self.seed)
        c = shape[0]
        size = shape[-1]
        if self.model == "lenet":
            from neuralign.federated.models import LeNet

            return LeNet(in_channels=c, num_classes=num_classes, image_size=size, **kwargs)
        return get_model(self.model, num_classes=num_classes, in_channels=c,
                         image_size=size, **kwargs)


_OPTIONAL = {"client_data": "partition", "input_shape": "", "num_classes": 0}


@functools.lru_cache(maxsize=4)
def _splits(dataset, subset, test_subset, root, data_seed):
    kw = {}
    if dataset.replace("-", "_") == "fashion_mnist":
        kw = {"root": root or None, "subset": subset or None, "test_subset": test_subset or None}
    return load_data(dataset, data_seed=data_seed, **kw)


@functools.lru_cache(maxsize=8)
def _partitions(dataset, subset, test_subset, root, data_seed, seed, n, alpha, min_size):
    labels = _splits(dataset, subset, test_subset, root, data_seed).train.tensors[1].numpy()
    return dirichlet_partition(labels, n, alpha, seed=seed, min_partition_size=min_size)
