"""Blended (Chen et al., 2017): a whole-image pattern blended into poisoned images, x' = (1−α)x + α·k.

The pattern k is uniform noise drawn from a fixed generator seed, so it is the same image on every
machine and for every run seed (the paper blends random noise or a cartoon; any fixed image does).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from backdoor_toolkit import Attack, AttackConfig, DataSpec, MaskTrigger, PluginMeta


class BlendedConfig(AttackConfig):
    alpha: float = Field(default=0.2, gt=0.0, le=1.0, description="Blend weight α of the pattern, in (0, 1]")
    pattern_seed: int = Field(
        default=1234, ge=0, le=2**31 - 1, description="Seed of the fixed uniform-noise pattern image"
    )


def noise_pattern(spec: DataSpec, seed: int) -> Tensor:
    """The fixed (C, H, W) uniform-noise pattern in [0, 1] for a dataset's image shape."""
    return torch.rand(spec.image_shape, generator=torch.Generator().manual_seed(seed))


class Blended(Attack):
    name = "blended"
    Config = BlendedConfig
    config: BlendedConfig
    meta = PluginMeta(
        summary="Fixed noise image blended into the whole input at weight α; poisoned samples relabelled",
        paper="Chen, Liu, Li, Lu, Song. Targeted Backdoor Attacks on Deep Learning Systems Using "
        "Data Poisoning",
        year=2017,
        url="https://arxiv.org/abs/1712.05526",
        threat_model="data poisoning (attacker controls part of the training set)",
    )

    def __init__(self, config: BlendedConfig, spec: DataSpec, seed: int = 0) -> None:
        super().__init__(config, spec, seed)
        mask = torch.full((1, spec.height, spec.width), config.alpha)
        self.trigger = MaskTrigger(mask, noise_pattern(spec, config.pattern_seed))

    def apply_trigger(self, images: Tensor) -> Tensor:
        return self.trigger(images)
