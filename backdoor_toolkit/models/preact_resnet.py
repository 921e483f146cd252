"""Pre-activation ResNet-18 exactly as BackdoorBench builds it (its `preactresnet18`).

He et al. (2016, "Identity Mappings in Deep Residual Networks") put BatchNorm and ReLU in front
of each convolution (full pre-activation units: BN-ReLU-conv-BN-ReLU-conv plus the identity, or a
1×1 projection of the pre-activated input when the shape changes). The paper's network, and
bdtk's `preact-resnet18`, add one more BN-ReLU after the last unit, before pooling. BackdoorBench's
model has no such layer: the last unit's sum goes straight to the average pool and the linear
head. Weights only mean what they meant under the forward pass they were trained with, so an
imported model needs this exact network, not the nearest one (with an extra BN-ReLU the features
would be clipped at zero and the head would see other numbers).

Apart from that missing layer the two networks are the same, unit for unit, so this model reuses
bdtk's pre-activation units and only drops the final BN-ReLU: `final` is the identity, and
`final_maps` (fine-pruning's hook) are the last unit's sums, unrectified, as BackdoorBench's own
fine-pruning sees them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .resnet import ResNet18


class BackdoorBenchPreActResNet18(ResNet18):
    """PreAct-ResNet-18 with the CIFAR stem (3×3 conv, no max-pool) and no BN-ReLU before pooling."""

    def __init__(
        self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__(in_channels, num_classes, mean, std, preact=True)
        self.final = nn.Identity()  # replaces the BN-ReLU: no parameters, no activation
