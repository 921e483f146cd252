"""Fine-tuning: plain supervised training on the clean budget — the baseline to beat.

`fine_tune` is the training step the other baselines reuse (fine-pruning after pruning, NAD for
its teacher and, with an extra loss term, its student), so they all train alike.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from backdoor_toolkit import (
    DefenseData,
    ImageClassifier,
    LossFn,
    PluginMeta,
    PurificationResult,
    Purifier,
    StrictConfig,
    TrainingSettings,
    accuracy,
    cross_entropy_loss,
    train_classifier,
)


class FineTuningConfig(StrictConfig):
    epochs: int = Field(default=10, ge=1, le=500, description="Epochs over the clean budget")
    lr: float = Field(default=0.01, gt=0, le=1, description="Initial SGD learning rate (cosine decay)")
    batch_size: int = Field(default=64, ge=1, le=4096, description="Batch size")
    weight_decay: float = Field(default=5e-4, ge=0, le=0.1, description="SGD weight decay")
    augment: bool = Field(default=True, description="Random crop (and flips where they fit)")


def fine_tune(
    model: nn.Module,
    data: DefenseData,
    config: FineTuningConfig,
    purifier: Purifier,
    loss_fn: LossFn = cross_entropy_loss,
    description: str = "fine-tune",
) -> list[float]:
    """Train `model` in place on the clean budget's train part; returns the epoch losses."""
    settings = TrainingSettings.from_config(config, data.spec, purifier.device)
    return train_classifier(
        model,
        data.train.images,
        data.train.labels,
        settings,
        seed=purifier.seed,
        loss_fn=loss_fn,
        description=description,
    )


class FineTuning(Purifier):
    name = "finetune"
    Config = FineTuningConfig
    config: FineTuningConfig
    meta = PluginMeta(
        summary="Supervised fine-tuning of the backdoored model on the clean budget",
        paper="Baseline used throughout the literature (e.g. Liu et al., RAID 2018; Li et al., ICLR 2021)",
        threat_model="defender holds a small clean set from the training distribution",
    )

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        losses = fine_tune(model, data, self.config, self)
        return PurificationResult(
            model=model,
            diagnostics={"final_loss": losses[-1], "val_accuracy": accuracy(model, data.val, self.device)},
        )
