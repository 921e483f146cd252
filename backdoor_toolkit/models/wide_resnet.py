"""Wide ResNet (Zagoruyko & Komodakis, 2016), the CIFAR variant the MCLDef and NAD authors use."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import ImageClassifier


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv-BN-ReLU-conv with a projection when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class WideResNet(ImageClassifier):
    def __init__(
        self,
        depth: int,
        widen: int,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(mean, std, num_classes)
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [
                _WideBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1)
                for j in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.final = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=False))
        self.fc = nn.Linear(widths[3], num_classes)
