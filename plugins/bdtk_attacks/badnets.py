"""BadNets (Gu et al., 2017): a small patch stamped in a corner, poisoned samples relabelled."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from backdoor_toolkit import Attack, AttackConfig, ConfigError, DataSpec, MaskTrigger, PluginMeta


class BadNetsConfig(AttackConfig):
    size: int = Field(default=3, ge=1, le=64, description="Side of the square patch, in pixels")
    pattern: Literal["checkerboard", "white"] = Field(
        default="checkerboard", description="Patch content: 3×3-style checkerboard or white square"
    )
    corner: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = Field(
        default="bottom-right", description="Where the patch goes"
    )
    margin: int = Field(default=0, ge=0, le=16, description="Gap between patch and image border")


class BadNets(Attack):
    name = "badnets"
    Config = BadNetsConfig
    config: BadNetsConfig
    meta = PluginMeta(
        summary="Patch trigger in a corner; poisoned training samples relabelled to the target",
        paper="Gu, Dolan-Gavitt, Garg. BadNets: Identifying Vulnerabilities in the Machine "
        "Learning Model Supply Chain",
        year=2017,
        url="https://arxiv.org/abs/1708.06733",
        threat_model="data poisoning (attacker controls part of the training set)",
    )

    def validate_for(self, spec: DataSpec) -> None:
        c = self.config
        if c.size + c.margin > min(spec.height, spec.width):
            raise ConfigError(
                f"badnets: a {c.size}px patch with margin {c.margin} does not fit "
                f"{spec.height}×{spec.width} images of {spec.name!r}."
            )

    def _mask_and_pattern(self) -> tuple[Tensor, Tensor]:
        c, s = self.config, self.spec
        mask = torch.zeros(1, s.height, s.width)
        patch = torch.ones(c.size, c.size)
        if c.pattern == "checkerboard":
            ii, jj = torch.meshgrid(torch.arange(c.size), torch.arange(c.size), indexing="ij")
            patch = ((ii + jj) % 2 == 0).float()
        top = c.margin if c.corner.startswith("top") else s.height - c.margin - c.size
        left = c.margin if c.corner.endswith("left") else s.width - c.margin - c.size
        mask[:, top : top + c.size, left : left + c.size] = 1.0
        pattern = torch.zeros(s.channels, s.height, s.width)
        pattern[:, top : top + c.size, left : left + c.size] = patch
        return mask, pattern

    def __init__(self, config: BadNetsConfig, spec: DataSpec, seed: int = 0) -> None:
        super().__init__(config, spec, seed)
        self.trigger = MaskTrigger(*self._mask_and_pattern())

    def apply_trigger(self, images: Tensor) -> Tensor:
        return self.trigger(images)
