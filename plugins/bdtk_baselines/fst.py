"""FST — Feature Shift Tuning (Min, Qin, Shen & Cheng, NeurIPS 2023).

Plain fine-tuning fails when the poisoning rate is low because the backdoor and clean features
are entangled: the backdoored head already fits the clean budget, so fine-tuning barely moves the
feature extractor and the backdoor features survive. FST forces the features to shift. The linear
head is re-initialised, and the whole network is fine-tuned on the clean budget with

    CE(f(x), y) + α·⟨W, W_ori⟩   subject to ‖W‖ = ‖W_ori‖,

where W_ori is the backdoored head's weight: the penalty pushes the new head away from the old
one (towards −W_ori, the minimum of the inner product on the sphere), so the feature extractor has
to re-learn features the new head can use. The norm constraint keeps the penalty from being
satisfied by shrinking or inflating W; it is enforced by rescaling W to the original Frobenius
norm after every optimiser step, as the authors' code does.

Training is the core fine-tuning seam (`fine_tune`): the penalty is its `loss_fn`, the projection
its `after_step`, so FST trains exactly like `finetune` apart from the head and the penalty.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

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
    Preset,
    PurificationResult,
    Purifier,
    accuracy,
    fine_tune,
)


class FSTConfig(FineTuneConfig):
    """The paper's CIFAR-10 recipe; batch size, weight decay and augmentation from the authors' code."""

    epochs: int = Field(default=10, ge=1, le=500, description="Epochs over the clean budget (paper: 10)")
    lr: float = Field(
        default=0.01, gt=0, le=1, description="Initial SGD learning rate, cosine decay (paper: 0.01)"
    )
    batch_size: int = Field(default=128, ge=1, le=4096, description="Batch size (authors' code: 128)")
    weight_decay: float = Field(
        default=0.0, ge=0, le=0.1, description="SGD weight decay (authors' code: none)"
    )
    alpha: float = Field(
        default=0.2,
        ge=0,
        le=100,
        description="Weight α of the penalty α·⟨W, W_ori⟩ pushing the new head away from the "
        "backdoored one (paper: 0.2 on CIFAR-10, 0.1 on GTSRB, 0.001 on CIFAR-100/Tiny-ImageNet)",
    )
    keep_norm: bool = Field(
        default=True,
        description="Rescale the head's weight to the backdoored head's norm after every step "
        "(the constraint ‖W‖ = ‖W_ori‖)",
    )


#: what every recipe of the paper shares (the authors' code's batch size, no weight decay)
_SHARED: dict[str, Any] = {"batch_size": 128, "weight_decay": 0.0, "augment": True, "keep_norm": True}


def reinitialise_head(head: nn.Linear, generator: torch.Generator) -> None:
    """Draw weight and bias from U(−1/√d, 1/√d), d = in_features, as `nn.Linear` does.

    The draw is made on the CPU from the purifier's seeded generator and then copied to the head's
    device, so the new head is the same on every device for a given seed.
    """
    bound = 1.0 / math.sqrt(head.in_features)
    with torch.no_grad():
        weight = (torch.rand(head.weight.shape, generator=generator) * 2 - 1) * bound
        head.weight.copy_(weight.to(head.weight.device))
        if head.bias is not None:
            bias = (torch.rand(head.bias.shape, generator=generator) * 2 - 1) * bound
            head.bias.copy_(bias.to(head.bias.device))


def project_to_norm(weight: Tensor, norm: float) -> None:
    """Rescale `weight` in place to Frobenius norm `norm` (the constraint ‖W‖ = C)."""
    with torch.no_grad():
        current = weight.norm()
        if float(current) > 0:
            weight.mul_(norm / current)


class FST(Purifier):
    name = "fst"
    Config = FSTConfig
    config: FSTConfig
    meta = PluginMeta(
        summary="Fine-tune with a re-initialised head pushed away from the backdoored head (feature shift)",
        paper="Min, Qin, Shen & Cheng, Towards Stable Backdoor Purification through Feature Shift "
        "Tuning, NeurIPS 2023",
        year=2023,
        url="https://arxiv.org/abs/2310.01875",
        threat_model="defender holds a small clean set from the training distribution",
        requires=(Capability.FEATURES,),
    )
    presets: ClassVar[dict[str, Preset]] = {
        "gtsrb": Preset(
            values={**_SHARED, "epochs": 15, "lr": 0.01, "alpha": 0.1},
            description="The paper's GTSRB recipe: 15 epochs, lr 0.01, α = 0.1",
        ),
        "cifar100": Preset(
            values={**_SHARED, "epochs": 15, "lr": 0.001, "alpha": 0.001},
            description="The paper's CIFAR-100 and Tiny-ImageNet recipe (with a 5% clean budget): "
            "15 epochs, lr 0.001, α = 0.001",
        ),
    }
    #: small settings for the registry-wide conformance check
    conformance_config: ClassVar[dict[str, Any]] = {"epochs": 1}

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        c = self.config
        head = getattr(model, "fc", None)
        if not isinstance(head, nn.Linear):
            raise ModelRequirementError(
                f"Defense 'fst' re-initialises the linear head `fc` on top of `features`, but "
                f"{type(model).__name__} has no nn.Linear `fc`."
            )
        model.to(self.device)
        before = accuracy(model, data.val, self.device)
        original = head.weight.detach().clone()
        norm = float(original.norm())

        reinitialise_head(head, torch.Generator().manual_seed(self.seed))
        if c.keep_norm:
            project_to_norm(head.weight, norm)

        def loss_fn(net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
            logits = net(x)
            shift = (head.weight * original).sum()
            return F.cross_entropy(logits, y) + c.alpha * shift, logits

        def after_step() -> None:
            if c.keep_norm:
                project_to_norm(head.weight, norm)

        losses = fine_tune(
            model,
            data,
            c,
            device=self.device,
            seed=self.seed,
            loss_fn=loss_fn,
            after_step=after_step,
            description="FST",
        )
        with torch.no_grad():
            cosine = float(F.cosine_similarity(head.weight.flatten(), original.flatten(), dim=0))
        return PurificationResult(
            model=model,
            notes=f"head cosine to the backdoored head {cosine:+.2f}",
            diagnostics={
                "val_accuracy_before": before,
                "val_accuracy_after": accuracy(model, data.val, self.device),
                "head_cosine": cosine,
                "head_norm": float(head.weight.detach().norm()),
                "original_head_norm": norm,
                "final_loss": losses[-1],
            },
        )
