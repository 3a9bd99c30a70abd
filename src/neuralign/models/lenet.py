"""The classic federated-learning CNN (LeNet-5 style, as in McMahan et al. and FedMA's LeNet).

``conv5x5(c1) - relu - maxpool2 - conv5x5(c2) - relu - maxpool2 - fc(hidden) - relu - fc``,
no normalisation layers, so FedMA can match every layer. Built by name: ``get_model("lenet")``.
Every layer's width is a constructor argument (``c1``, ``c2``, ``hidden``), so a model whose
widths FedMA grew is rebuilt from what its checkpoint records.
"""

from __future__ import annotations

from torch import nn

from neuralign.errors import NeuralignError


class LeNet(nn.Module):
    """``c1`` / ``c2`` default to ``width`` and ``round(width * 8 / 3)`` (6 -> 16 as in
    LeNet-5); ``hidden`` is the fully connected layer's width."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 6, hidden: int = 64, c1: int | None = None,
                 c2: int | None = None):
        super().__init__()
        c1 = width if c1 is None else c1
        c2 = round(width * 8 / 3) if c2 is None else c2
        if min(c1, c2, hidden) < 1:
            raise NeuralignError(f"LeNet widths must be >= 1, got c1={c1}, c2={c2}, "
                                 f"hidden={hidden}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2))
        s = ((image_size - 4) // 2 - 4) // 2
        if s < 1:
            raise NeuralignError(f"LeNet needs images of at least 16x16, got {image_size}")
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(nn.Linear(c2 * s * s, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def widths(self) -> dict:
        """The constructor's width arguments that rebuild this model's current shapes."""
        return {"c1": self.features[0].out_channels, "c2": self.features[3].out_channels,
                "hidden": self.fc[0].out_features}

    def forward(self, x):
        return self.classifier(self.fc(self.flatten(self.features(x))))
