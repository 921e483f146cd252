"""Neural Cleanse's adaptive λ, one per class, so the batched scan treats every class as if alone.

λ weighs the mask's L1 norm against reaching the class. It goes up (×up) after `patience` rounds
in a row in which the trigger reached the success threshold — the mask can afford to shrink — and
down (÷down) after `patience` rounds below it, so a class that lost its trigger gets it back.
As in Neural Cleanse, λ is 0 until a class's trigger first reaches the threshold (the norm is
not penalised while no trigger exists yet), then starts at its initial value and adapts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LambdaSchedule:
    """Per-class λ and its counters of consecutive rounds above and below the success threshold."""

    lam: Tensor  # (K,) float64
    above: Tensor  # (K,) int64
    below: Tensor  # (K,) int64
    started: Tensor  # (K,) bool: the trigger has reached the threshold once; λ adapts from then on
    raised: Tensor  # (K,) bool: λ went up at least once
    lowered: Tensor  # (K,) bool: λ went down at least once
    up: float
    down: float
    patience: int
    threshold: float

    @classmethod
    def start(
        cls, k: int, init: float, up: float, down: float, patience: int, threshold: float
    ) -> LambdaSchedule:
        zeros = torch.zeros(k, dtype=torch.long)
        no = torch.zeros(k, dtype=torch.bool)
        lam = torch.full((k,), init, dtype=torch.float64)
        return cls(lam, zeros, zeros.clone(), no, no.clone(), no.clone(), up, down, patience, threshold)

    @property
    def effective(self) -> Tensor:
        """λ in use: 0 until a class's trigger first works (pure CE finds a trigger fast), then λ."""
        return torch.where(self.started, self.lam, torch.zeros_like(self.lam))

    @property
    def explored(self) -> Tensor:
        """Classes whose λ went both up and down: their mask has been squeezed to its limit."""
        return self.raised & self.lowered

    def update(self, success: Tensor, active: Tensor) -> None:
        """Record one round's attack success (K,) for the `active` (K,) bool classes; adapt λ."""
        hit = success.cpu() >= self.threshold
        self.started |= active.cpu() & hit
        active = active.cpu() & self.started
        self.above = torch.where(active, torch.where(hit, self.above + 1, 0), self.above)
        self.below = torch.where(active, torch.where(hit, 0, self.below + 1), self.below)
        raise_ = self.above >= self.patience
        lower = self.below >= self.patience
        self.lam = torch.where(raise_, self.lam * self.up, self.lam)
        self.lam = torch.where(lower, self.lam / self.down, self.lam)
        self.raised |= raise_
        self.lowered |= lower
        self.above = torch.where(raise_, 0, self.above)
        self.below = torch.where(lower, 0, self.below)
