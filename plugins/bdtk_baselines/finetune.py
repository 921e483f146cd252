"""Fine-tuning: plain supervised training on the clean budget — the baseline to beat.

It is the core's fine-tuning seam (`FineTuneConfig`, `fine_tune`) and nothing more; fine-pruning,
NAD and nc-unlearning train through the same seam, so they all train alike.
"""

from __future__ import annotations

from backdoor_toolkit import (
    DefenseData,
    FineTuneConfig,
    ImageClassifier,
    PluginMeta,
    PurificationResult,
    Purifier,
    accuracy,
    fine_tune,
)


class FineTuningConfig(FineTuneConfig):
    # exactly the seam's fields and defaults; a class of its own (without a docstring) so that the
    # config's JSON schema (`bdtk plugins show finetune --json`) keeps its title and description
    pass


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
        losses = fine_tune(model, data, self.config, device=self.device, seed=self.seed)
        return PurificationResult(
            model=model,
            diagnostics={"final_loss": losses[-1], "val_accuracy": accuracy(model, data.val, self.device)},
        )
