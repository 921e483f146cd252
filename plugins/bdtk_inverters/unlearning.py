"""Neural Cleanse unlearning: fine-tune with reversed triggers stamped on images that keep their labels.

The reversed trigger stands in for the real one; seeing it on images of every class with the
true label teaches the model that the trigger means nothing. When the inverter flags no class
there is nothing to unlearn, and the model is handed back untouched.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from backdoor_toolkit import (
    DefenseData,
    FineTuneConfig,
    ImageClassifier,
    PluginMeta,
    PurificationResult,
    Purifier,
    StrictConfig,
    accuracy,
    create_inverter,
    fine_tune,
)


class NCUnlearningConfig(FineTuneConfig):
    # the training fields come from FineTuneConfig (listed first); only `epochs` says more here
    inverter: str = Field(
        default="neural-cleanse", min_length=1, description="Registered inverter to use: NAME or NAME:PRESET"
    )
    inverter_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings for the inverter's Config (validated by it), over its preset's values",
    )
    stamp_ratio: float = Field(
        default=0.2, gt=0, lt=1, description="Share of each batch stamped with a reversed trigger"
    )
    epochs: int = Field(default=10, ge=1, le=500, description="Fine-tuning epochs over the clean budget")


class NCUnlearning(Purifier):
    name = "nc-unlearning"
    Config = NCUnlearningConfig
    config: NCUnlearningConfig
    meta = PluginMeta(
        summary="Invert triggers (Neural Cleanse), then fine-tune with them stamped under true labels",
        paper="Wang et al., Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
        year=2019,
        url="https://doi.org/10.1109/SP.2019.00031",
        threat_model="defender holds a small clean set; white-box gradients",
    )
    conformance_config: ClassVar[dict[str, Any]] = {
        "inverter_config": {"steps": 5, "batch_size": 8, "eval_images": 16},
        "epochs": 1,
    }

    def __init__(self, config: StrictConfig, seed: int = 0, device: torch.device | None = None) -> None:
        """Resolves the inverter now: a misspelt name or setting fails when the runner checks the
        grid, before anything trains, not in the cell after the victim's training."""
        super().__init__(config, seed, device)
        c = self.config
        self.inverter = create_inverter(
            c.inverter, c.inverter_config, seed=seed, where=f"nc-unlearning inverter {c.inverter!r}"
        )

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        c = self.config
        model.to(self.device)
        result = self.inverter.invert(model, data)
        # recorded under the same keys as every purifier that runs an inverter (InversionKeys)
        diagnostics: dict[str, Any] = result.summary()
        stages = {"inversion": result.seconds}
        if not result.flagged:
            return PurificationResult(
                model=model,
                modified=False,
                detected=False,
                notes="no backdoor detected",
                diagnostics=diagnostics,
                stage_seconds=stages,
                inversion=result,
            )
        triggers = [result.trigger(k) for k in result.flagged]
        gen = torch.Generator().manual_seed(self.seed)

        def stamp(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            chosen = torch.rand(x.shape[0], generator=gen) < c.stamp_ratio
            which = torch.randint(0, len(triggers), (x.shape[0],), generator=gen)
            x = x.clone()
            for i, trigger in enumerate(triggers):
                rows = chosen & (which == i)
                if bool(rows.any()):
                    x[rows] = trigger(x[rows]).clamp(0, 1)
            return x, y

        start = time.perf_counter()
        losses = fine_tune(
            model, data, c, device=self.device, seed=self.seed, batch_hook=stamp, description="nc-unlearning"
        )
        stages["unlearning"] = time.perf_counter() - start
        diagnostics.update({"final_loss": losses[-1], "val_accuracy": accuracy(model, data.val, self.device)})
        return PurificationResult(
            model=model,
            detected=True,
            notes=f"unlearned reversed trigger(s) of class(es) {', '.join(map(str, result.flagged))}",
            diagnostics=diagnostics,
            stage_seconds=stages,
            inversion=result,
        )
