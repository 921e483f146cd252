"""Fine-tuning: plain supervised training on the clean budget — the baseline to beat."""

from __future__ import annotations

from pydantic import Field

from backdoor_toolkit import (
    DefenseData,
    ImageClassifier,
    PluginMeta,
    PurificationResult,
    Purifier,
    StrictConfig,
    TrainingSettings,
    accuracy,
    train_classifier,
)


class FineTuningConfig(StrictConfig):
    epochs: int = Field(default=10, ge=1, le=500, description="Epochs over the clean budget")
    lr: float = Field(default=0.01, gt=0, le=1, description="Initial SGD learning rate (cosine decay)")
    batch_size: int = Field(default=64, ge=1, le=4096, description="Batch size")
    weight_decay: float = Field(default=5e-4, ge=0, le=0.1, description="SGD weight decay")
    augment: bool = Field(default=True, description="Random crop (and flips where they fit)")


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
        c = self.config
        settings = TrainingSettings(
            epochs=c.epochs,
            batch_size=c.batch_size,
            lr=c.lr,
            weight_decay=c.weight_decay,
            augment=c.augment,
            hflip=data.spec.hflip,
            device=self.device,
        )
        losses = train_classifier(
            model, data.train.images, data.train.labels, settings, seed=self.seed, description="fine-tune"
        )
        return PurificationResult(
            model=model,
            diagnostics={"final_loss": losses[-1], "val_accuracy": accuracy(model, data.val, self.device)},
        )
