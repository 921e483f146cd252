"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible, fixed warp of the image as the trigger.

A random k×k flow field, normalised and upsampled to the image size, displaces pixels by at most
about s pixels; warped images are relabelled. The attack controls training: in every (augmented)
batch a `poison_rate` share is warped and relabelled, and in "noise mode" `cross_ratio` times as
many are warped with the field plus random per-pixel noise and keep their labels, which forces the
model to learn the exact warp rather than any warp. Nothing is poisoned ahead of training.

By default the raw batch is warped and the training loop augments it afterwards (random crop and
flip), the order of the authors' training code (warp, then their post-tensor augmentation), which
BackdoorBench follows too; `warp_order="after-augment"` warps the augmented batch instead, so a
crop never shifts the warp against the image (bdtk's order before 2026-12-01, and that of the
WaNet numbers measured before then in docs/).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from backdoor_toolkit import (
    Attack,
    AttackConfig,
    ConfigError,
    DataSpec,
    ImageData,
    PluginMeta,
    PoisonedTrainingSet,
    to_float,
)


class WaNetConfig(AttackConfig):
    poison_rate: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Share of every training batch that is warped and relabelled"
    )
    grid_size: int = Field(default=4, ge=2, le=64, description="Side k of the random control grid (k×k)")
    strength: float = Field(
        default=0.5,
        gt=0.0,
        le=10.0,
        description="Warping strength s: the flow is s/H in grid units (at most about s pixels)",
    )
    grid_rescale: float = Field(default=1.0, gt=0.0, le=2.0, description="Scale of the warped grid")
    cross_ratio: float = Field(
        default=2.0, ge=0.0, le=10.0, description="Noise-mode samples per warped sample (0 disables it)"
    )
    warp_order: Literal["before-augment", "after-augment"] = Field(
        default="before-augment",
        description="before-augment: warp raw images, then augment (the authors' code); "
        "after-augment: warp augmented images, so a crop never shifts the warp",
    )


class WaNet(Attack):
    name = "wanet"
    Config = WaNetConfig
    config: WaNetConfig
    meta = PluginMeta(
        summary="Fixed smooth warp as trigger, poisoned per batch during training, with noise mode",
        paper="Nguyen, Tran. WaNet - Imperceptible Warping-based Backdoor Attack",
        year=2021,
        url="https://arxiv.org/abs/2102.10369",
        threat_model="training control (attacker runs the training loop)",
    )

    def __init__(self, config: WaNetConfig, spec: DataSpec, seed: int = 0) -> None:
        super().__init__(config, spec, seed)
        gen = torch.Generator().manual_seed(seed)
        k = config.grid_size
        control = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        self.control = control / control.abs().mean()
        self._noise_gen = torch.Generator().manual_seed(seed + 2)
        self._build_grid()

    def poisons_augmented_batches(self) -> bool:
        return self.config.warp_order == "after-augment"

    def validate_for(self, spec: DataSpec) -> None:
        if self.config.grid_size > min(spec.height, spec.width):
            raise ConfigError(
                f"wanet: a {self.config.grid_size}×{self.config.grid_size} control grid is finer than "
                f"the {spec.height}×{spec.width} images of {spec.name!r}."
            )

    def _build_grid(self) -> None:
        """The sampling grid (1, H, W, 2) in grid_sample's [-1, 1] coordinates, (x, y) order."""
        c, h, w = self.config, self.spec.height, self.spec.width
        flow = F.interpolate(self.control, size=(h, w), mode="bicubic", align_corners=True)
        flow = flow.permute(0, 2, 3, 1)  # (1, H, W, 2)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1).unsqueeze(0)
        scale = torch.tensor([w, h], dtype=torch.float32)
        self.grid = ((identity + c.strength * flow / scale) * c.grid_rescale).clamp(-1, 1)

    def _warp(self, images: Tensor, grid: Tensor) -> Tensor:
        grid = grid.to(images.device, images.dtype).expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(images, grid, align_corners=True).clamp(0, 1)

    def apply_trigger(self, images: Tensor) -> Tensor:
        return self._warp(images, self.grid)

    def poison_training_set(self, train: ImageData) -> PoisonedTrainingSet:
        """Nothing ahead of training: the batches are poisoned on the fly."""
        return PoisonedTrainingSet(
            to_float(train.images), train.labels.clone(), torch.empty(0, dtype=torch.long)
        )

    def training_batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Warp and relabel the first share of the batch; warp the next ones with noise, labels kept."""
        c, (b, _, h, w) = self.config, images.shape
        n_bd = int(b * c.poison_rate)
        n_cross = min(int(n_bd * c.cross_ratio), b - n_bd)
        images, labels = images.clone(), labels.clone()
        if n_bd:
            images[:n_bd] = self.apply_trigger(images[:n_bd])
            labels[:n_bd] = self.target_labels(labels[:n_bd])
        if n_cross:
            noise = (torch.rand(n_cross, h, w, 2, generator=self._noise_gen) * 2 - 1) / torch.tensor([w, h])
            grid = (self.grid + noise).clamp(-1, 1)
            images[n_bd : n_bd + n_cross] = self._warp(images[n_bd : n_bd + n_cross], grid)
        return images, labels

    def trigger_state(self) -> dict[str, Tensor]:
        return {"control": self.control}

    def load_trigger_state(self, state: dict[str, Tensor]) -> None:
        self.control = state["control"]
        self._build_grid()
