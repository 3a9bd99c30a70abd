"""Federated learning on Flower: FedAvg, FedProx, FedPFN, FedPNU, FedMA (extra ``fl``).

Use :func:`run_federated` for a run on one machine; ``make_client_app`` / ``make_server_app``
(and the module-level apps in :mod:`neuralign.federated.app`) for Flower's engines;
:func:`load_node_data` / :func:`write_node_data` for SuperNodes that read their own data.
"""

from neuralign.federated.node_data import load_node_data, write_node_data
from neuralign.federated.partition import dirichlet_partition, label_histogram
from neuralign.federated.task import FedTask

__all__ = [
    "FedAvg",
    "FedPFN",
    "FedPNU",
    "FedProx",
    "FedTask",
    "LocalGrid",
    "dirichlet_partition",
    "label_histogram",
    "load_node_data",
    "local_train",
    "make_client_app",
    "make_server_app",
    "make_strategy",
    "match_layer",
    "matched_average_step",
    "run_federated",
    "write_node_data",
]


def __getattr__(name):  # Flower is imported only when a Flower-backed name is used
    if name == "run_federated":
        from neuralign.federated.runner import run_federated
        return run_federated
    if name in ("make_client_app", "local_train"):
        from neuralign.federated import client
        return getattr(client, name)
    if name == "make_server_app":
        from neuralign.federated.server import make_server_app
        return make_server_app
    if name in ("make_strategy", "FedPFN", "FedPNU", "FedAvg", "FedProx"):
        from neuralign.federated import strategies
        return getattr(strategies, name)
    if name in ("match_layer", "matched_average_step"):
        from neuralign.federated import fedma
        return getattr(fedma, name)
    if name == "LocalGrid":
        from neuralign.federated.local_grid import LocalGrid
        return LocalGrid
    raise AttributeError(f"module 'neuralign.federated' has no attribute {name!r}")
