"""What the inverters of this package share: input checks and the recovered triggers' attack success.

Every inverter here must refuse bad input with the same sentences and measure a recovered
trigger's success on the same images in the same way, or `bdtk inspect` would show two inverters'
numbers that cannot be compared. Stamping and the outlier test live in the core
(`stamp_all`, `anomaly_index`, `flag_targets`); this module holds only what the core leaves to
inverters.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from backdoor_toolkit import BdtkError, DefenseData, StrictConfig, stamp_all, to_float

__all__ = ["TriggerSearchConfig", "attack_success", "check_inputs", "model_device"]


class TriggerSearchConfig(StrictConfig):
    """The settings Neural Cleanse and blend inversion share: which classes, the Adam steps in tanh
    space, Neural Cleanse's λ schedule and per-class early stop, the MAD test and where attack
    success is measured. One definition, so the two inverters' options keep the same names,
    bounds and meaning (`bdtk inspect` shows them side by side); each inverter sets its own
    `steps` and `early_stop_patience` defaults and adds its own fields. "Trigger size" is the
    mask's L1 norm (for a blend, α·H·W)."""

    target: int | None = Field(
        default=None, ge=0, description="Known target class: invert only it and skip the scan"
    )
    classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, min_length=1, description="Invert only these classes (default: all)"
    )
    steps: int = Field(default=500, ge=1, le=100_000, description="Step budget: optimiser steps per class")
    batch_size: int = Field(
        default=32, ge=1, le=4096, description="Clean images per step (each stamped once per active class)"
    )
    lr: float = Field(default=0.1, gt=0, le=10, description="Adam learning rate in tanh space")
    lambda_init: float = Field(
        default=1e-2, ge=0, le=10, description="Initial weight λ of the mask's L1 norm"
    )
    lambda_up: float = Field(default=1.5, gt=1, le=10, description="Factor λ is multiplied by when raised")
    lambda_down: float = Field(
        default=1.5**1.5, gt=1, le=10, description="Factor λ is divided by when lowered"
    )
    success_threshold: float = Field(
        default=0.99, gt=0, le=1, description="Attack success a trigger must reach to count as working"
    )
    round_steps: int = Field(
        default=5, ge=1, le=10_000, description="Steps per round; λ and early stopping are decided per round"
    )
    patience: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Rounds in a row above (below) the threshold before λ goes up (down)",
    )
    early_stop_patience: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="Rounds without a smaller trigger (after λ went both up and down) before a class is "
        "frozen",
    )
    early_stop_delta: float = Field(
        default=0.01,
        ge=0,
        lt=1,
        description="Relative decrease of the trigger size that counts as an improvement",
    )
    threshold: float = Field(
        default=2.0, gt=0, le=100, description="Anomaly index above which a below-median class is flagged"
    )
    log_norms: bool = Field(
        default=True, description="Anomaly index on log trigger sizes (False: on the sizes, as in the paper)"
    )
    eval_images: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Clean images (val part) on which attack success is measured",
    )

    @model_validator(mode="after")
    def _target_or_classes(self) -> TriggerSearchConfig:
        """One of them decides which classes are inverted; silently preferring one would run a
        different scan from the one asked for."""
        if self.target is not None and self.classes is not None:
            raise ValueError(
                f"target={self.target} (a known target, no scan) and classes={self.classes} (scan these) "
                "contradict each other; give one"
            )
        return self


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_inputs(model: nn.Module, data: DefenseData, classes: list[int], who: str) -> None:
    """Fail with one clear `BdtkError` before any optimisation starts; `who` names the inverter."""
    spec = data.spec
    if len(data.train) == 0:
        raise BdtkError(f"{who} needs clean images, but the defender's training part is empty.")
    spec.check_images(data.train.images)
    if len(data.val):
        spec.check_images(data.val.images)
    bad = [k for k in classes if not 0 <= k < spec.num_classes]
    if bad:
        raise BdtkError(
            f"Class index {bad[0]} is out of range for {spec.name!r}, which has classes "
            f"0–{spec.num_classes - 1}."
        )
    if len(set(classes)) != len(classes):
        raise BdtkError(f"Classes to invert contain duplicates: {classes}.")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(to_float(data.train.images[:2]).to(device))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BdtkError(
            f"The model fails on images of shape {tuple(data.train.images.shape[1:])}: {first}"
        ) from None
    finally:
        model.train(was_training)
    if logits.dim() != 2 or logits.shape[1] != spec.num_classes:
        raise BdtkError(
            f"The model returns logits of shape {tuple(logits.shape)}, but {spec.name!r} has "
            f"{spec.num_classes} classes: expected (N, {spec.num_classes})."
        )


@torch.no_grad()
def attack_success(
    model: nn.Module,
    data: DefenseData,
    classes: list[int],
    masks: Tensor,
    patterns: Tensor,
    eval_images: int,
) -> Tensor:
    """(K,) share of clean images of other classes that each trigger sends to its class.

    Measured on the defender's `val` part (its `train` part when `val` is empty), at most
    `eval_images` images, never on test data: the val images were not used to optimise the
    triggers, so a trigger that only fits its own batches does not look better than it is.
    """
    pool = data.val if len(data.val) else data.train
    images, labels = pool.images[:eval_images], pool.labels[:eval_images]
    device = model_device(model)
    targets = torch.tensor(classes)
    hits = torch.zeros(len(classes))
    counts = torch.zeros(len(classes))
    # about 256 stamped images per forward: larger batches of small images run slower on CPU (cache)
    chunk = max(1, 256 // len(classes))
    for s in range(0, len(labels), chunk):
        x = to_float(images[s : s + chunk]).to(device)
        y = labels[s : s + chunk]
        pred = model(stamp_all(x, masks, patterns)).argmax(1).view(len(classes), -1).cpu()
        victim = y.unsqueeze(0) != targets.unsqueeze(1)
        hits += ((pred == targets.unsqueeze(1)) & victim).sum(1)
        counts += victim.sum(1)
    return hits / counts.clamp_min(1)
