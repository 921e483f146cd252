"""A small three-stage CNN: fast enough for tests and laptop experiments."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import ImageClassifier


class SmallCNN(ImageClassifier):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 32,
    ) -> None:
        super().__init__(mean, std, num_classes)

        def stage(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return nn.Sequential(*layers)

        self.stem = nn.Identity()
        self.groups = nn.ModuleList(
            [
                stage(in_channels, width, True),
                stage(width, 2 * width, True),
                stage(2 * width, 4 * width, False),
            ]
        )
        self.final = nn.Identity()
        self.fc = nn.Linear(4 * width, num_classes)
