"""The classic federated-learning CNN (LeNet-5 style, as in McMahan et al. and FedMA's LeNet).

``conv5x5(c1) - relu - maxpool2 - conv5x5(c2) - relu - maxpool2 - fc(hidden) - relu - fc``,
no normalisation layers, so FedMA can match every layer. Built by name ``"lenet"`` in
:class:`neuralign.federated.FedTask` (the shared model registry has no such model).
"""

from __future__ import annotations

from torch import nn


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 6, hidden: int = 64):
        super().__init__()
        c1, c2 = width, round(width * 8 / 3)  # 6 -> 16 as in LeNet-5
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2))
        s = ((image_size - 4) // 2 - 4) // 2
        if s < 1:
            raise ValueError(f"LeNet needs images of at least 16x16, got {image_size}")
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(nn.Linear(c2 * s * s, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.fc(self.flatten(self.features(x))))
