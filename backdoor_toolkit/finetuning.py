"""The fine-tuning seam defenses share: `FineTuneConfig` and `fine_tune`.

Many defenses end (or start) by fine-tuning the model on the defender's clean budget: plain
fine-tuning, fine-pruning after pruning, NAD for its teacher and, with an extra loss term, its
student, Neural Cleanse unlearning with reversed triggers stamped on some images. Declaring the
training fields once and training through one function keeps their settings, bounds and
descriptions alike, and means a change to how defenses train (the optimiser, the schedule, the
augmentation) happens in one place rather than in a copy per plugin.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn

from .config import StrictConfig
from .data import DefenseData
from .training import BatchHook, LossFn, TrainingSettings, cross_entropy_loss, train_classifier


class FineTuneConfig(StrictConfig):
    """The training fields of a defense that fine-tunes on the clean budget.

    Subclass it and add the defense's own fields; a subclass may re-declare a field to change
    its default or description (NAD trains its student for 20 epochs, not 10).
    """

    epochs: int = Field(default=10, ge=1, le=500, description="Epochs over the clean budget")
    lr: float = Field(default=0.01, gt=0, le=1, description="Initial SGD learning rate (cosine decay)")
    batch_size: int = Field(default=64, ge=1, le=4096, description="Batch size")
    weight_decay: float = Field(default=5e-4, ge=0, le=0.1, description="SGD weight decay")
    augment: bool = Field(default=True, description="Random crop (and flips where they fit)")


def fine_tune(
    model: nn.Module,
    data: DefenseData,
    config: FineTuneConfig,
    *,
    device: torch.device,
    seed: int,
    loss_fn: LossFn = cross_entropy_loss,
    batch_hook: BatchHook | None = None,
    after_step: Callable[[], None] | None = None,
    description: str = "fine-tune",
) -> list[float]:
    """Train `model` in place on the clean budget's train part; returns the epoch losses.

    It is `train_classifier` (SGD with momentum 0.9, cosine schedule over the run's real length)
    with `config`'s settings, flips only where `data.spec` allows them, and the data fixed to
    `data.train`: `data.val` stays held out for whatever the defense tunes on it. `loss_fn` adds
    terms to the loss (NAD's attention distillation), `batch_hook` rewrites each batch before
    augmentation (stamping reversed triggers), `after_step` runs after each optimiser step (e.g.
    to keep pruned weights at zero). Pass the purifier's `device` and `seed`, so a re-run of a
    cell reproduces its numbers. The model is left in `eval()` mode.
    """
    settings = TrainingSettings.from_config(config, data.spec, device)
    return train_classifier(
        model,
        data.train.images,
        data.train.labels,
        settings,
        seed=seed,
        batch_hook=batch_hook,
        loss_fn=loss_fn,
        description=description,
        after_step=after_step,
    )
