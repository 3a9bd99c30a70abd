"""Small reference models: MLP, VGG, ResNet-20 (width multiplier, BN / LN / no norm), small CNN.

``norm="ln"`` in the convolutional models is a channel-only LayerNorm (:class:`LayerNorm2d`);
``norm="gn1"`` is GroupNorm with one group (over C, H, W), what ``"ln"`` built before
architecture version 2 (see ``neuralign.models.registry``).

All take image tensors ``(N, C, H, W)``; the MLP flattens whatever it is given. Every model ends
in a module named ``classifier`` (the head), and its blocks are its top-level children in order.
"""

from __future__ import annotations

from torch import nn

from neuralign.errors import NeuralignError


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` map at every position (as REPAIR's
    ``LayerNorm2d`` and Git Re-Basin's ResNets), with a per-channel affine. A subclass of
    ``nn.LayerNorm`` so that code treating norm layers specially (freezing, refusals) sees it;
    its channel axis is 1, not the last."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return LayerNorm2d(channels)
    if kind == "gn1":
        # GroupNorm with one group normalises over C, H and W together: the "ln" of
        # neuralign before channel-only LayerNorm (old checkpoints are rebuilt with it)
        return nn.GroupNorm(1, channels)
    if kind in ("none", None):
        return nn.Identity()
    raise NeuralignError(f"norm must be 'bn', 'ln', 'gn1' or 'none', got {kind!r}")


def _kaiming_init(model: nn.Module) -> None:
    """He initialisation of convolutions (fan-in, He et al. 2015), so that deep
    norm-free variants train too."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with ReLU, then a linear classifier."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, width: int = 512,
                 depth: int = 3, norm: str = "none"):
        super().__init__()
        if depth < 1 or width < 1:
            raise NeuralignError("MLP needs depth >= 1 and width >= 1")
        if norm not in ("none", None, "ln", "bn"):
            raise NeuralignError(f"MLP norm must be 'bn', 'ln' or 'none', got {norm!r}")
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        d = in_features
        for i in range(depth):
            block = [nn.Linear(d, width)]
            if norm == "ln":
                block.append(nn.LayerNorm(width))
            elif norm == "bn":
                block.append(nn.BatchNorm1d(width))
            block.append(nn.ReLU())
            self.add_module(f"layer{i + 1}", nn.Sequential(*block))
            layers.append(getattr(self, f"layer{i + 1}"))
            d = width
        self.depth = depth
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, x):
        x = self.flatten(x)
        for i in range(self.depth):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.classifier(x)


VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-11/16 for small images. Pooling stages that would shrink the map below 1x1 are skipped,
    so 28x28 (4 poolings) and 32x32 (5 poolings) inputs both work."""

    def __init__(self, cfg: str = "vgg11", in_channels: int = 1, num_classes: int = 10,
                 norm: str = "bn", width: float = 1.0, image_size: int = 28):
        super().__init__()
        if cfg not in VGG_CFGS:
            raise NeuralignError(f"unknown VGG config {cfg!r}; choose from {sorted(VGG_CFGS)}")
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in VGG_CFGS[cfg]:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = max(1, round(v * width))
            layers.append(nn.Sequential(nn.Conv2d(c, out, 3, padding=1), _norm2d(norm, out),
                                        nn.ReLU()))
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        _kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
        self.norm1 = _norm2d(norm, cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
        self.norm2 = _norm2d(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=norm == "none"), _norm2d(norm, cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, CIFAR variant): 3 stages of 3 basic blocks, 16/32/64 channels
    times ``width``."""

    def __init__(self, width: int = 1, norm: str = "bn", in_channels: int = 1,
                 num_classes: int = 10, blocks_per_stage: int = 3):
        super().__init__()
        w = [int(16 * width), int(32 * width), int(64 * width)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=norm == "none"),
                                  _norm2d(norm, w[0]), nn.ReLU())
        cin = w[0]
        for s, cout in enumerate(w):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, norm))
                cin = cout
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin, num_classes)
        _kaiming_init(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(self.flatten(self.pool(x)))


class SmallCNN(nn.Module):
    """Four conv layers (width, width, 2*width, 2*width) with BN and two poolings."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 norm: str = "bn"):
        super().__init__()
        w1, w2 = width, 2 * width

        def conv(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _norm2d(norm, cout),
                                 nn.ReLU())

        self.block1 = nn.Sequential(conv(in_channels, w1), conv(w1, w1), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(conv(w1, w2), conv(w2, w2), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(w2, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.block2(self.block1(x)))))
