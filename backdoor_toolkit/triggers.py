"""Triggers: anything that stamps a batch of [0, 1] images, and the mask-and-pattern kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


class Trigger(Protocol):
    """Stamps a float batch (B, C, H, W) in [0, 1] and returns a new batch; inputs are untouched."""

    def __call__(self, images: Tensor) -> Tensor: ...


@dataclass
class MaskTrigger:
    """x' = (1 − m)·x + m·p, with mask m (1, H, W) shared by channels and pattern p (C, H, W)."""

    mask: Tensor
    pattern: Tensor

    def __call__(self, images: Tensor) -> Tensor:
        m = self.mask.to(images.device, images.dtype)
        p = self.pattern.to(images.device, images.dtype)
        return (1 - m) * images + m * p

    @property
    def l1_norm(self) -> float:
        return float(self.mask.abs().sum())
