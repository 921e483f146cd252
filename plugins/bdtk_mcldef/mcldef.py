"""MCLDef (Yue et al., 2022): recover the trigger, then unlearn it by model-contrastive learning.

Stage 1 asks a trigger inverter from the registry, by name, for each class's trigger and for the
classes it flags as backdoor targets. Stage 2 fine-tunes the model with the model-contrastive
loss alone (see `loss.py`): every clean batch is stamped with the recovered trigger(s), and the
trainable model's feature of the triggered input is pulled towards the frozen backdoored model's
feature of the clean input and pushed away from its feature of the triggered input.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.nn import functional as F

from backdoor_toolkit import (
    Capability,
    ConfigError,
    DefenseData,
    ImageClassifier,
    ImageData,
    InversionResult,
    MaskTrigger,
    PluginMeta,
    PurificationResult,
    Purifier,
    StrictConfig,
    accuracy,
    augment_batch,
    build_config,
    get_inverter,
    iterate_batches,
    predict,
)

from .loss import FrozenReference, model_contrastive_loss


class DegenerateTriggerWarning(UserWarning):
    """A recovered trigger is empty or does not fire; MCLDef refuses to purify with it."""


class MCLDefConfig(StrictConfig):
    inverter: str = Field(default="neural-cleanse", min_length=1, description="Registered trigger inverter")
    inverter_config: dict[str, Any] = Field(
        default_factory=dict, description="Config values passed to the inverter's own Config"
    )
    target: int | None = Field(
        default=None,
        ge=0,
        description="Known target class: invert only it and purify against it (no detection)",
    )
    on_no_detection: Literal["skip", "top-ranked"] = Field(
        default="skip",
        description="No class flagged: return the model unchanged, or purify with the top-ranked class",
    )
    min_attack_success: float = Field(
        default=0.5, ge=0, le=1, description="A recovered trigger firing less often than this is degenerate"
    )
    min_mask_l1: float = Field(
        default=0.01, ge=0, le=1e6, description="A recovered mask with a smaller L1 norm is degenerate"
    )
    epochs: int = Field(default=20, ge=1, le=1000, description="Epochs of contrastive fine-tuning")
    batch_size: int = Field(default=64, ge=2, le=4096, description="Clean images per batch")
    lr: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="SGD learning rate for the first 1/20 of epochs; then /10 until half, /100 after",
    )
    weight_decay: float = Field(default=1e-4, ge=0, le=0.1, description="SGD weight decay")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    temperature: float = Field(default=0.5, gt=0, le=100, description="Temperature τ of the contrastive loss")
    ce_weight: float = Field(
        default=0.0, ge=0, le=100, description="Weight λ of an added cross-entropy term (see ce_on)"
    )
    ce_on: Literal["clean", "clean+triggered"] = Field(
        default="clean",
        description="Inputs of the added cross-entropy term: clean ones, or clean and triggered ones (the "
        "triggered image keeps its true label, as in Neural Cleanse's unlearning)",
    )
    augment: bool = Field(default=True, description="Random crop (and flips where they fit) of each batch")
    stamp: Literal["after-augment", "before-augment"] = Field(
        default="after-augment",
        description="Stamp the recovered trigger on the augmented image (authors' code: the trigger stays "
        "where it was recovered), or before augmenting, so the pair is cropped and mirrored together and the "
        "trigger moves with the image as the attacker's poisoned training images did",
    )
    bn_mode: Literal["train", "eval"] = Field(
        default="train",
        description="Mode of the trainable model while purifying: train (BatchNorm statistics follow the "
        "batches, as in the authors' code) or eval (statistics frozen)",
    )

    @model_validator(mode="after")
    def _ce_on_needs_a_weight(self) -> MCLDefConfig:
        if self.ce_on != "clean" and self.ce_weight == 0:
            raise ValueError(f"ce_on={self.ce_on!r} has no effect with ce_weight=0; set ce_weight > 0")
        return self


def step_lr(epoch: int, epochs: int, lr: float) -> float:
    """The authors' 0 / 1–9 / 10–19 step schedule of 20 epochs, scaled to `epochs`."""
    first = max(1, round(epochs / 20))
    half = max(first, epochs // 2)
    if epoch < first:
        return lr
    return lr / 10 if epoch < half else lr / 100


class MCLDef(Purifier):
    name = "mcldef"
    Config = MCLDefConfig
    config: MCLDefConfig
    meta = PluginMeta(
        summary="Trigger inversion, then model-contrastive fine-tuning that dissolves the trigger's "
        "feature cluster",
        paper="Yue, Lin, Zhang, Li, Zhang. Model-Contrastive Learning for Backdoor Defense "
        "(arXiv 2205.04411; ACM MM 2023 as Model-Contrastive Learning for Backdoor Elimination)",
        year=2022,
        url="https://arxiv.org/abs/2205.04411",
        threat_model="defender holds the backdoored model and a small clean set; target unknown",
        requires=(Capability.FEATURES,),
    )

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        c = self.config
        if c.target is not None and c.target >= data.spec.num_classes:
            raise ConfigError(
                f"mcldef: target {c.target} is outside the {data.spec.num_classes} classes of "
                f"{data.spec.name!r} (0–{data.spec.num_classes - 1})."
            )
        model.to(self.device).eval()
        start = time.perf_counter()
        inversion = self._invert(model, data)
        stage_seconds = {"inversion": time.perf_counter() - start}
        diagnostics = _inversion_diagnostics(inversion)

        chosen, detected, notes = self._choose_targets(inversion)
        diagnostics["chosen_targets"] = chosen
        if not chosen:
            return PurificationResult(
                model, modified=False, detected=detected, notes=notes, diagnostics=diagnostics,
                stage_seconds=stage_seconds,
            )  # fmt: skip
        usable, degenerate = self._usable(inversion, chosen)
        diagnostics["degenerate"] = degenerate
        if degenerate:
            message = "DEGENERATE TRIGGER, not used: " + "; ".join(
                f"class {d['class']} ({d['reason']})" for d in degenerate
            )
            warnings.warn(f"mcldef: {message}", DegenerateTriggerWarning, stacklevel=2)
            notes = f"{notes} {message}.".strip()
        if not usable:
            notes += " No usable trigger: model returned unchanged."
            return PurificationResult(
                model, modified=False, detected=detected, notes=notes, diagnostics=diagnostics,
                stage_seconds=stage_seconds,
            )  # fmt: skip

        triggers = [inversion.trigger(cls) for cls in usable]
        diagnostics["purified_targets"] = usable
        diagnostics["val_accuracy_before"] = accuracy(model, data.val, self.device)
        diagnostics["val_trigger_asr_before"] = self._trigger_asr(model, data.val, usable, triggers)
        start = time.perf_counter()
        losses = self._contrastive_finetune(model, data, triggers)
        stage_seconds["purification"] = time.perf_counter() - start
        diagnostics["epoch_losses"] = losses
        diagnostics["final_loss"] = losses[-1]
        diagnostics["val_accuracy_after"] = accuracy(model, data.val, self.device)
        diagnostics["val_trigger_asr_after"] = self._trigger_asr(model, data.val, usable, triggers)
        notes += f" Purified against class(es) {usable} with {len(triggers)} recovered trigger(s)."
        return PurificationResult(
            model, modified=True, detected=detected, notes=notes.strip(), diagnostics=diagnostics,
            stage_seconds=stage_seconds,
        )  # fmt: skip

    # --- stage 1 ---------------------------------------------------------------------------

    def _invert(self, model: ImageClassifier, data: DefenseData) -> InversionResult:
        c = self.config
        cls = get_inverter(c.inverter)
        inverter_config = build_config(cls.Config, c.inverter_config, f"mcldef inverter {c.inverter!r}")
        inverter = cls(inverter_config, seed=self.seed)
        classes = None if c.target is None else [c.target]
        return inverter.invert(model, data, classes)

    def _choose_targets(self, inversion: InversionResult) -> tuple[list[int], bool | None, str]:
        """The classes to purify against, whether a backdoor was detected, and notes saying why."""
        c = self.config
        if c.target is not None:
            return [c.target], None, f"Known target {c.target} given; no detection run."
        if inversion.flagged:
            return list(inversion.flagged), True, f"Inverter {c.inverter!r} flagged {inversion.flagged}."
        top = inversion.ranked()[0]
        i = inversion.classes.index(top)
        summary = (
            f"No class flagged by {c.inverter!r} (top-ranked class {top}, anomaly index "
            f"{float(inversion.anomaly_index[i]):.2f})."
        )
        if c.on_no_detection == "top-ranked":
            return [top], False, f"{summary} Proceeding with the top-ranked class as asked."
        return [], False, f"{summary} Model returned unchanged (on_no_detection='skip')."

    def _usable(
        self, inversion: InversionResult, chosen: list[int]
    ) -> tuple[list[int], list[dict[str, Any]]]:
        """Split chosen classes into usable triggers and degenerate ones (empty mask or no effect)."""
        c = self.config
        usable, degenerate = [], []
        for cls in chosen:
            i = inversion.classes.index(cls)
            norm, success = float(inversion.mask_norms[i]), float(inversion.attack_success[i])
            if norm < c.min_mask_l1:
                degenerate.append({"class": cls, "reason": f"mask L1 {norm:.4g} < {c.min_mask_l1}"})
            elif success < c.min_attack_success:
                degenerate.append(
                    {
                        "class": cls,
                        "reason": f"inversion attack success {success:.3f} < {c.min_attack_success}",
                    }
                )
            else:
                usable.append(cls)
        return usable, degenerate

    # --- stage 2 ---------------------------------------------------------------------------

    def _contrastive_finetune(
        self, model: ImageClassifier, data: DefenseData, triggers: list[MaskTrigger]
    ) -> list[float]:
        """Fine-tune `model` in place; each image is stamped with one of `triggers` drawn at random."""
        c, device = self.config, self.device
        frozen = FrozenReference(copy.deepcopy(model)).to(device)
        masks = torch.stack([t.mask for t in triggers]).to(device)
        patterns = torch.stack([t.pattern for t in triggers]).to(device)
        model.train(c.bn_mode == "train")
        optimiser = torch.optim.SGD(
            model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
        )
        gen = torch.Generator().manual_seed(self.seed)
        epoch_losses = []
        for epoch in range(c.epochs):
            for group in optimiser.param_groups:
                group["lr"] = step_lr(epoch, c.epochs, c.lr)
            seen, total = 0, 0.0
            for x, y in iterate_batches(data.train.images, data.train.labels, c.batch_size, gen):
                x, triggered = self._pairs(x.to(device), masks, patterns, data.spec.hflip, gen)
                y = y.to(device)
                loss = self._loss(model, frozen, x, triggered, y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                seen += y.numel()
                total += float(loss.detach()) * y.numel()
            epoch_losses.append(total / max(seen, 1))
        model.eval()
        return epoch_losses

    def _pairs(
        self, x: Tensor, masks: Tensor, patterns: Tensor, hflip: bool, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Clean and triggered views of a batch; each image gets one of the triggers at random."""
        c = self.config
        if c.augment and c.stamp == "after-augment":
            x = augment_batch(x, hflip, gen)
        which = torch.randint(masks.shape[0], (x.shape[0],), generator=gen).to(x.device)
        triggered = ((1 - masks[which]) * x + masks[which] * patterns[which]).clamp(0, 1)
        if c.augment and c.stamp == "before-augment":
            # channels side by side: each clean/triggered pair gets the same crop and flip
            pair = augment_batch(torch.cat([x, triggered], dim=1), hflip, gen)
            x, triggered = pair.split(x.shape[1], dim=1)
        return x, triggered

    def _loss(
        self,
        model: ImageClassifier,
        frozen: FrozenReference,
        clean: Tensor,
        triggered: Tensor,
        labels: Tensor,
    ) -> Tensor:
        c = self.config
        positive, negative = frozen.positives_and_negatives(clean, triggered)
        if c.ce_weight == 0:
            return model_contrastive_loss(model.features(triggered), positive, negative, c.temperature)
        features = model.features(torch.cat([triggered, clean]))
        contrastive = model_contrastive_loss(features[: clean.shape[0]], positive, negative, c.temperature)
        if c.ce_on == "clean":
            features, targets = features[clean.shape[0] :], labels
        else:  # the triggered images keep their true labels
            targets = torch.cat([labels, labels])
        return contrastive + c.ce_weight * F.cross_entropy(model.fc(features), targets)

    def _trigger_asr(
        self, model: ImageClassifier, val: ImageData, targets: list[int], triggers: list[MaskTrigger]
    ) -> dict[str, float]:
        """Share of non-target validation images each recovered trigger sends to its class."""
        out = {}
        for cls, trigger in zip(targets, triggers, strict=True):
            victims = val.labels != cls
            if not bool(victims.any()):
                continue
            pred = predict(model, val.images[victims], self.device, transform=trigger)
            out[str(cls)] = float((pred == cls).float().mean())
        return out


def _inversion_diagnostics(inversion: InversionResult) -> dict[str, Any]:
    return {
        "inversion_classes": list(inversion.classes),
        "flagged": list(inversion.flagged),
        "anomaly_index": [round(float(v), 4) for v in inversion.anomaly_index],
        "mask_norms": [round(float(v), 4) for v in inversion.mask_norms],
        "inversion_attack_success": [round(float(v), 4) for v in inversion.attack_success],
        "inverter_seconds": inversion.seconds,
    }
