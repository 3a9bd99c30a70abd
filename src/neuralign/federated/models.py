"""The federated LeNet; it lives in :mod:`neuralign.models.lenet` (``get_model("lenet")``)."""

from neuralign.models.lenet import LeNet

__all__ = ["LeNet"]
