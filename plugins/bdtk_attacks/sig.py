"""SIG (Barni, Kallas, Tondi, ICIP 2019): a horizontal sinusoid added to target-class images only.

Clean-label: the poisoned training images already belong to the target class and keep their
labels, so the poisoned set passes a label audit; the model learns to associate the sinusoid with
the target class because it co-occurs with it. The signal is v(i, j) = Δ·sin(2π·j·f / W) on every
row and channel; the default Δ = 40/255 follows BackdoorBench (the paper used about 20/255 on MNIST).
The default rate is 5 % of the training set: at the suite's usual 10 % a balanced 10-class dataset
would have *every* target-class image poisoned, which costs the target class its clean accuracy.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from backdoor_toolkit import Attack, AttackConfig, ConfigError, DataSpec, PluginMeta


class SIGConfig(AttackConfig):
    poison_rate: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Share of the training set that is poisoned (target-class images only; default half "
        "of a balanced 10-class target class, as the paper poisons part of it)",
    )
    delta: float = Field(
        default=40 / 255, gt=0.0, le=1.0, description="Amplitude Δ of the sinusoid in [0, 1] pixel units"
    )
    frequency: float = Field(default=6.0, gt=0.0, le=64.0, description="Periods f across the image width")


class SIG(Attack):
    name = "sig"
    Config = SIGConfig
    config: SIGConfig
    clean_label = True
    meta = PluginMeta(
        summary="Clean-label: a horizontal sinusoid added to target-class training images, labels kept",
        paper="Barni, Kallas, Tondi. A New Backdoor Attack in CNNs by Training Set Corruption "
        "Without Label Poisoning",
        year=2019,
        url="https://arxiv.org/abs/1902.11237",
        threat_model="clean-label data poisoning (attacker adds a signal to target-class images)",
    )

    def validate_for(self, spec: DataSpec) -> None:
        if self.config.mode != "all-to-one":
            raise ConfigError("sig: the clean-label SIG attack is all-to-one only (one target class).")

    def __init__(self, config: SIGConfig, spec: DataSpec, seed: int = 0) -> None:
        super().__init__(config, spec, seed)
        cols = torch.arange(spec.width, dtype=torch.float32)
        row = config.delta * torch.sin(2 * math.pi * cols * config.frequency / spec.width)
        self.signal = row.expand(spec.channels, spec.height, spec.width).contiguous()

    def apply_trigger(self, images: Tensor) -> Tensor:
        return (images + self.signal.to(images.device, images.dtype)).clamp(0, 1)

    def poison_candidates(self, labels: Tensor) -> Tensor:
        """Only target-class images: the clean-label threat model keeps every label."""
        return torch.nonzero(labels == self.config.target).squeeze(1)

    def choose_poisoned(self, labels: Tensor) -> Tensor:
        share = float((labels == self.config.target).float().mean())
        if self.config.poison_rate > share + 1e-9:
            raise ConfigError(
                f"sig: poison_rate={self.config.poison_rate} exceeds the share of target class "
                f"{self.config.target} in the training set ({share:.4f}); a clean-label attack can only "
                f"poison target-class images. Lower poison_rate to at most {share:.4f}."
            )
        return super().choose_poisoned(labels)
