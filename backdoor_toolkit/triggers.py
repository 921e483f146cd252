"""Triggers: anything that stamps a batch of [0, 1] images, and the mask-and-pattern kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


def stamp(images: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """(1 − m)·x + m·p: the mask-and-pattern stamp, the one place the formula is written.

    Attacks (a stamped patch), inverters (a candidate trigger) and purifiers (a recovered one) all
    stamp this way; one definition keeps their images identical bit for bit, so a recovered trigger
    is measured exactly as it was optimised. Shapes broadcast: a mask (1, H, W) over a batch
    (B, C, H, W), one mask per image (B, 1, H, W), or K triggers over one batch (see
    `inversion.stamp_all`). Devices and dtypes must already agree.
    """
    return (1 - mask) * images + mask * pattern


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
        return stamp(images, m, p)

    @property
    def l1_norm(self) -> float:
        return float(self.mask.abs().sum())
