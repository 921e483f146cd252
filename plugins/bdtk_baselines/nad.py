"""NAD — Neural Attention Distillation (Li et al., ICLR 2021).

A teacher, fine-tuned from the backdoored model on the clean budget, hands its attention maps to
the student (the backdoored model itself), which is trained with cross-entropy plus
β-weighted attention-distillation terms on the outputs of the last layer groups. The attention
map of an output a (B, C, H, W) is A = mean over channels of |a|^p, flattened and L2-normalised
per image; the distance is the mean squared difference of the normalised maps (mean over images
and positions). That is the form the published β values (500/1000/1000 here, 5000 in the paper's
code) are calibrated for: with the paper's un-squared L2 norm the same β would swamp the
cross-entropy term.
"""

from __future__ import annotations

import copy
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import (
    Capability,
    DefenseData,
    FineTuneConfig,
    ImageClassifier,
    ModelRequirementError,
    PluginMeta,
    PurificationResult,
    Purifier,
    accuracy,
    fine_tune,
)


def attention_map(activation: Tensor, p: float) -> Tensor:
    """(B, C, H, W) → (B, H·W): channel mean of |a|^p, L2-normalised per image."""
    return F.normalize(activation.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor, p: float) -> Tensor:
    """Mean squared difference of the normalised attention maps of two activations."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class GroupOutputs:
    """Records the outputs of chosen modules on every forward pass (forward hooks)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.outputs: list[Tensor] = []
        self.handles = [m.register_forward_hook(self._record) for m in modules]

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.outputs.append(output)

    def take(self) -> list[Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class NADConfig(FineTuneConfig):
    """Student settings are the fine-tuning fields; the teacher has its own epoch count."""

    epochs: int = Field(default=20, ge=1, le=500, description="Student epochs over the clean budget")
    teacher_epochs: int = Field(default=10, ge=1, le=500, description="Teacher fine-tuning epochs")
    betas: list[Annotated[float, Field(ge=0, le=1e6)]] = Field(
        default_factory=lambda: [500.0, 1000.0, 1000.0],
        min_length=1,
        max_length=8,
        description="Distillation weights for the last len(betas) layer groups, in network order",
    )
    p: float = Field(default=2.0, gt=0, le=8, description="Power of |activation| in the attention map")


class NAD(Purifier):
    name = "nad"
    Config = NADConfig
    config: NADConfig
    meta = PluginMeta(
        summary="Distil a fine-tuned teacher's attention maps into the backdoored student",
        paper="Li, Lyu, Koren, Lyu, Li & Ma, Neural Attention Distillation: Erasing Backdoor Triggers "
        "from Deep Neural Networks, ICLR 2021",
        year=2021,
        url="https://arxiv.org/abs/2101.05930",
        threat_model="defender holds a small clean set from the training distribution",
        requires=(Capability.LAYER_GROUPS,),
    )

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        c = self.config
        groups = model.layer_groups()
        if len(groups) < len(c.betas):
            raise ModelRequirementError(
                f"Defense 'nad' distils {len(c.betas)} layer groups (one per beta) but "
                f"{type(model).__name__} has {len(groups)}; pass fewer betas."
            )
        chosen = groups[len(groups) - len(c.betas) :]
        before = accuracy(model, data.val, self.device)

        teacher = copy.deepcopy(model)
        shared = c.model_dump(include=set(FineTuneConfig.model_fields))
        teacher_cfg = FineTuneConfig.model_validate({**shared, "epochs": c.teacher_epochs})
        fine_tune(teacher, data, teacher_cfg, device=self.device, seed=self.seed, description="NAD teacher")
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        teacher_acc = accuracy(teacher, data.val, self.device)

        student_hooks = GroupOutputs(chosen)
        offset = len(groups) - len(c.betas)
        teacher_hooks = GroupOutputs(teacher.layer_groups()[offset:])

        def loss_fn(student: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
            logits = student(x)
            with torch.no_grad():
                teacher(x)
            loss = F.cross_entropy(logits, y)
            for beta, s, t in zip(c.betas, student_hooks.take(), teacher_hooks.take(), strict=True):
                loss = loss + beta * attention_loss(s, t, c.p)
            return loss, logits

        try:
            losses = fine_tune(
                model, data, c, device=self.device, seed=self.seed, loss_fn=loss_fn, description="NAD student"
            )
        finally:
            student_hooks.remove()
            teacher_hooks.remove()
        return PurificationResult(
            model=model,
            diagnostics={
                "val_accuracy_before": before,
                "teacher_val_accuracy": teacher_acc,
                "val_accuracy_after": accuracy(model, data.val, self.device),
                "distilled_groups": list(range(offset, len(groups))),
                "final_loss": losses[-1],
            },
        )
