"""SAU — Shared Adversarial Unlearning (Wei, Zhang, Zha & Wu, NeurIPS 2023).

A triggered input is an adversarial example that the backdoored model and every model still
carrying its backdoor misclassify *the same way*. The paper bounds the backdoor risk of a purified
model h by its risk on the *shared* adversarial examples (SAEs) of h and the backdoored model h₀:
perturbations that fool both into one and the same wrong class. SAU alternates, batch by batch on
the clean budget:

1. **Maximise** (PGD under an L∞ bound ε, started at +ε): find a perturbation δ that is adversarial
   for h and h₀ (β_adv · L_adv, the cross-entropy of both on x + δ, counted only where a model
   is not fooled yet) and makes their predictions agree (β_share · L_share, the Jensen–Shannon
   divergence of their softmax outputs, counted where the example is not yet shared).
2. **Minimise**, one optimiser step on h: λ_clean · CE(h(x), y) + λ_at · CE(h(x + δ), y)
   + λ_sar · L_sar, where L_sar = −log(1 − p_h(ŷ₀ | x + δ)) on the examples that fool h₀
   (ŷ₀ = h₀(x + δ), neither the true label nor h₀'s clean prediction): h is pushed to classify the
   shared adversarial example correctly *or* differently from h₀, which breaks the shared path
   the backdoor uses.

Defaults are the authors' (the paper's experimental setup and BackdoorBench's
`config/defense/sau/config.yaml`): ε = 0.2 in pixel units, 5 PGD steps of 0.2, β_adv = 0.01,
β_share = 1, λ_clean = λ_sar = 1, λ_at = 0 (BackdoorBench's optional plain adversarial term, off
by default), Adam (AMSGrad) at a constant lr of 1e-4 without weight decay, batch 256, 100 epochs,
no augmentation, BatchNorm in eval mode. Nothing is tuned, so nothing is chosen on data:
`data.val` is only reported on. docs/defenses/baselines.md lists the sources and the deviations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import (
    BdtkError,
    DefenseData,
    ImageClassifier,
    PluginMeta,
    Preset,
    PurificationResult,
    Purifier,
    StrictConfig,
    accuracy,
    augment_batch,
    check_finite,
    iterate_batches,
    preferred_layout,
)

PgdInit = Literal["max", "min", "zero", "random"]


class SAUConfig(StrictConfig):
    epochs: int = Field(
        default=100, ge=1, le=1000, description="Epochs over the clean budget (paper: 100 on CIFAR-10/GTSRB)"
    )
    lr: float = Field(default=1e-4, gt=0, le=1, description="Adam (AMSGrad) learning rate, constant")
    batch_size: int = Field(default=256, ge=1, le=4096, description="Clean batch size")
    weight_decay: float = Field(default=0.0, ge=0, le=0.1, description="Adam weight decay")
    augment: bool = Field(
        default=False, description="Random crop (and flips where they fit) before each batch's PGD"
    )
    eps: float = Field(
        default=0.2, gt=0, le=1, description="L∞ bound of the perturbation, in pixel units (images in [0, 1])"
    )
    pgd_steps: int = Field(default=5, ge=1, le=200, description="PGD steps per batch")
    pgd_step_size: float = Field(default=0.2, gt=0, le=1, description="PGD signed-gradient step size")
    pgd_init: PgdInit = Field(
        default="max",
        description="PGD start: max (+ε everywhere), min (−ε), zero, or random (uniform in the ε-box)",
    )
    clip: bool = Field(
        default=False,
        description="Clip perturbed images to [0, 1] (the authors leave them unclipped)",
    )
    beta_adv: float = Field(
        default=0.01, ge=0, le=100, description="Weight of the adversarial loss L_adv in SAE generation"
    )
    beta_share: float = Field(
        default=1.0, ge=0, le=100, description="Weight of the agreement loss L_share (JS) in SAE generation"
    )
    lambda_clean: float = Field(default=1.0, ge=0, le=100, description="Weight of the clean cross-entropy")
    lambda_at: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="Weight of the cross-entropy on the perturbed images (plain adversarial training)",
    )
    lambda_sar: float = Field(
        default=1.0, ge=0, le=100, description="Weight of the shared adversarial risk term L_sar"
    )
    batchnorm_train: bool = Field(
        default=False,
        description="Update step with BatchNorm in train mode (batch statistics, running statistics "
        "updated); the authors' default keeps it in eval mode",
    )


#: Every value of the authors' recipe (the paper's setup; BackdoorBench's config/defense/sau/config.yaml).
PAPER_RECIPE: dict[str, Any] = {
    "epochs": 100,
    "lr": 1e-4,
    "batch_size": 256,
    "weight_decay": 0.0,
    "augment": False,
    "eps": 0.2,
    "pgd_steps": 5,
    "pgd_step_size": 0.2,
    "pgd_init": "max",
    "clip": False,
    "beta_adv": 0.01,
    "beta_share": 1.0,
    "lambda_clean": 1.0,
    "lambda_at": 0.0,
    "lambda_sar": 1.0,
    "batchnorm_train": False,
}


def js_divergence(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Per-example Jensen–Shannon divergence (nats) of two softmax outputs, from log-probabilities.

    Computed from `log_softmax` rather than from clamped probabilities so that confident outputs
    neither give log(0) nor lose their gradient.
    """
    log_p, log_q = F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(1) + (log_q.exp() * (log_q - log_m)).sum(1))


def log_one_minus_prob(logits: Tensor, classes: Tensor) -> Tensor:
    """log(1 − softmax(logits)[i, classes[i]]) per example, without cancellation.

    It is log Σ_{k ≠ c} p_k = logsumexp of the other logits − logsumexp of all: exact even when p_c
    is within float precision of 1, where log(1 − p_c) would be −inf.
    """
    others = logits.scatter(1, classes.view(-1, 1), float("-inf"))
    return torch.logsumexp(others, dim=1) - torch.logsumexp(logits, dim=1)


def shared_adversarial_risk(
    logits_perturbed: Tensor, reference_labels: Tensor, fooled_reference: Tensor
) -> Tensor:
    """L_sar: mean over the batch of −log(1 − p(ŷ₀ | x + δ)) on the examples that fool the reference.

    Examples that do not fool the backdoored reference add nothing (they are not adversarial for
    it, so they cannot be shared); the sum is divided by the whole batch, as in the authors' code.
    """
    if not bool(fooled_reference.any()):
        return logits_perturbed.sum() * 0.0  # zero, but still part of the graph: backward() works
    terms = -log_one_minus_prob(logits_perturbed[fooled_reference], reference_labels[fooled_reference])
    return terms.sum() / logits_perturbed.shape[0]


@dataclass
class SharedPGD:
    """PGD that looks for shared adversarial examples of `model` and the frozen `reference`.

    Both models are used as they are (the caller puts them in eval mode); only the perturbation
    receives gradients, so neither model's parameter gradients are touched.
    """

    model: nn.Module
    reference: nn.Module
    config: SAUConfig
    stats: dict[str, float] = field(default_factory=dict)

    def perturb(self, x: Tensor, delta: Tensor) -> Tensor:
        """x + δ, clipped to [0, 1] only when `clip` is set (the authors do not clip)."""
        out = x + delta
        return out.clamp(0.0, 1.0) if self.config.clip else out

    def start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The initial perturbation, inside the ε-box."""
        eps = self.config.eps
        init = self.config.pgd_init
        if init == "max":
            return torch.full_like(x, eps)
        if init == "min":
            return torch.full_like(x, -eps)
        if init == "random":
            return ((torch.rand(x.shape, generator=generator) * 2 - 1) * eps).to(x.device, x.dtype)
        return torch.zeros_like(x)

    def attack(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """δ with ‖δ‖∞ ≤ ε after at most `pgd_steps` signed-gradient steps.

        Each step lowers β_adv · L_adv + β_share · L_share, where L_adv is minus the mean
        cross-entropy of both models on the examples that do not fool each yet (so the examples are
        pushed across the boundary but their loss does not grow without limit once they are across)
        and L_share is the JS divergence of the two models on the examples that are not yet shared.
        "Fooled" means predicting other than the model's own clean prediction. The search stops
        early once every example of the batch is shared.
        """
        c = self.config
        batch = x.shape[0]
        with torch.no_grad():
            clean_pred = self.model(x).argmax(1)
            clean_pred_ref = self.reference(x).argmax(1)
        delta = self.start(x, generator)
        steps = 0
        with torch.enable_grad():  # callers may hold no_grad; only δ gets gradients
            for _ in range(c.pgd_steps):
                delta.requires_grad_(True)
                perturbed = self.perturb(x, delta)
                logits, logits_ref = self.model(perturbed), self.reference(perturbed)
                pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
                fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
                shared = fooled & fooled_ref & (pred == pred_ref)
                if bool(shared.all()):
                    break
                ce = F.cross_entropy(logits, y, reduction="none")
                ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
                loss_adv = -(ce[~fooled].sum() + ce_ref[~fooled_ref].sum()) / (2 * batch)
                loss_share = js_divergence(logits, logits_ref)[~shared].sum() / batch
                loss = c.beta_adv * loss_adv + c.beta_share * loss_share
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() - c.pgd_step_size * grad.sign()).clamp(-c.eps, c.eps)
                steps += 1
        self.stats = {"pgd_steps": float(steps)}
        return delta.detach()


class SAU(Purifier):
    name = "sau"
    Config = SAUConfig
    config: SAUConfig
    meta = PluginMeta(
        summary="Unlearn shared adversarial examples of the backdoored and the purified model",
        paper="Wei, Zhang, Zha & Wu, Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning "
        "Shared Adversarial Examples, NeurIPS 2023",
        year=2023,
        url="https://arxiv.org/abs/2307.10562",
        threat_model="defender holds a small clean set from the training distribution",
        requires=(),
    )
    presets: ClassVar[dict[str, Preset]] = {
        "short": Preset(
            values={**PAPER_RECIPE, "epochs": 20},
            description="The paper's recipe with its Tiny ImageNet length: 20 epochs, a fifth of the compute",
        ),
    }
    conformance_config: ClassVar[dict[str, Any]] = {"epochs": 1, "batch_size": 16, "pgd_steps": 2}

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        c, device = self.config, self.device
        if data.train.labels.numel() == 0:
            raise BdtkError(
                "Defense 'sau' needs clean training images; the clean budget's train part is empty."
            )
        before = accuracy(model, data.val, device)
        model.to(device).eval()
        # the fastest layout while training; the caller gets the model back in the layout it handed in
        with preferred_layout(model, device) as layout:
            reference = copy.deepcopy(model).eval()
            for param in reference.parameters():
                param.requires_grad_(False)
            pgd = SharedPGD(model, reference, c)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimiser = torch.optim.Adam(trainable, lr=c.lr, weight_decay=c.weight_decay, amsgrad=True)
            gen = torch.Generator().manual_seed(self.seed)
            history: list[dict[str, float]] = []
            for epoch in range(c.epochs):
                totals: dict[str, float] = {}
                seen = 0
                for x_cpu, y_cpu in iterate_batches(data.train.images, data.train.labels, c.batch_size, gen):
                    if c.augment:
                        x_cpu = augment_batch(x_cpu, data.spec.hflip, gen)
                    x = x_cpu.to(device).contiguous(memory_format=layout)
                    y = y_cpu.to(device)
                    parts = self._step(model, reference, pgd, optimiser, x, y, gen)
                    if not math.isfinite(parts["loss"]):
                        raise BdtkError(
                            f"sau: the unlearning loss became {parts['loss']} in epoch {epoch + 1}; "
                            f"lower sau.lr (now {c.lr:g}) or the loss weights."
                        )
                    n = y.numel()
                    seen += n
                    for key, value in parts.items():
                        totals[key] = totals.get(key, 0.0) + value * n
                history.append({key: value / seen for key, value in totals.items()})
        model.eval()
        check_finite(model, "sau")
        after = accuracy(model, data.val, device)
        last = history[-1]
        return PurificationResult(
            model=model,
            notes=f"{c.epochs} epochs; last epoch: {last['shared_rate']:.0%} of clean images had a "
            f"shared adversarial example",
            diagnostics={
                "val_accuracy_before": before,
                "val_accuracy_after": after,
                "final_loss": last["loss"],
                "final_losses": {k: last[k] for k in ("loss_clean", "loss_at", "loss_sar")},
                "epoch_losses": [h["loss"] for h in history],
                "shared_rate": [h["shared_rate"] for h in history],
                "reference_fooled_rate": [h["reference_fooled_rate"] for h in history],
                "mean_pgd_steps": [h["pgd_steps"] for h in history],
            },
        )

    def _step(
        self,
        model: nn.Module,
        reference: nn.Module,
        pgd: SharedPGD,
        optimiser: torch.optim.Optimizer,
        x: Tensor,
        y: Tensor,
        gen: torch.Generator,
    ) -> dict[str, float]:
        """Generate the batch's SAEs with the current model, then take one unlearning step."""
        c = self.config
        delta = pgd.attack(x, y, gen)
        perturbed = pgd.perturb(x, delta)
        batch = x.shape[0]
        model.train(c.batchnorm_train)
        logits, logits_p = model(torch.cat([x, perturbed])).split(batch)
        model.eval()
        with torch.no_grad():
            clean_pred_ref = reference(x).argmax(1)
            pred_ref = reference(perturbed).argmax(1)
        # adversarial for the backdoored model: wrong, and not merely its clean mistake repeated
        fooled_ref = (pred_ref != y) & (pred_ref != clean_pred_ref)
        loss_clean = F.cross_entropy(logits, y)
        loss_at = F.cross_entropy(logits_p, y)
        loss_sar = shared_adversarial_risk(logits_p, pred_ref, fooled_ref)
        loss = c.lambda_clean * loss_clean + c.lambda_at * loss_at + c.lambda_sar * loss_sar
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            shared = (logits_p.argmax(1) == pred_ref) & fooled_ref
        return {
            "loss": float(loss.detach()),
            "loss_clean": float(loss_clean.detach()),
            "loss_at": float(loss_at.detach()),
            "loss_sar": float(loss_sar.detach()),
            "shared_rate": float(shared.float().mean()),
            "reference_fooled_rate": float(fooled_ref.float().mean()),
            "pgd_steps": pgd.stats["pgd_steps"],
        }
