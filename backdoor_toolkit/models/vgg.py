"""VGG-11 with BatchNorm, CIFAR-style (one linear head), for 28×28 and 32×32 inputs alike."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import ImageClassifier

_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG11BN(ImageClassifier):
    def __init__(
        self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__(mean, std, num_classes)
        self.stem = nn.Identity()
        groups, cin = [], in_channels
        for widths in _STAGES:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                cin = w
            # ceil_mode keeps a 1×1 map at the fifth pool for 28×28 inputs
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            groups.append(nn.Sequential(*layers))
        self.groups = nn.ModuleList(groups)
        self.final = nn.Identity()
        self.fc = nn.Linear(512, num_classes)
