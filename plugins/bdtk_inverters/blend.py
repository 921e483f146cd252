"""Blend inversion: the smallest whole-image blend (1 − α)·x + α·p that sends clean images to a class.

Neural Cleanse looks for a small *mask*; a global trigger (SIG's sinusoid, Blended's noise image)
covers every pixel faintly, so its mask is large and the target does not stand out (on the bench
SIG model Neural Cleanse's index of the target was 1.60, below the threshold). Here the mask is
tied to one scalar α on every pixel, which is exactly the Blended attack's injection function
(Chen et al., 2017) and, on dark pixels, an additive one such as SIG's; α is what is made small.
A backdoor target should be reached with a fainter universal pattern than a natural class — the
observation behind Universal Soldier (Xu, Ersoy, Picek, 2023), which detects backdoors by how
little universal perturbation a class needs — so Neural Cleanse's MAD outlier test runs on the
per-class α, with one more condition: a flagged α must also be at most `max_ratio` of the median
(an effect size). docs/inversion.md says where this flags the target, where it only ranks it,
and that on the bench Fashion-MNIST clean models it flags natural classes (Shirt, Bag, Pullover)
on two seeds of three: it is an opt-in inverter, not part of MCLDef's default.

The result is an ordinary `InversionResult`: mask k is α_k on every pixel (so its L1 norm is
α_k·H·W) and pattern k is p_k, so `result.trigger(k)` stamps (1 − α_k)·x + α_k·p_k and every
purifier uses it unchanged. All classes are optimised as one batched problem with Neural Cleanse's
per-class λ schedule; a class whose best α stops improving leaves the batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import (
    DefenseData,
    ImageClassifier,
    InversionKeys,
    InversionResult,
    PluginMeta,
    TriggerInverter,
    anomaly_index,
    flag_targets,
    preferred_layout,
    stamp_all,
    to_float,
)

from .common import TriggerSearchConfig, attack_success, check_inputs, model_device
from .schedule import LambdaSchedule

ADAM_BETAS = (0.5, 0.9)  # Neural Cleanse's, so the two inverters' steps compare
ADAM_EPS = 1e-8
K = InversionKeys


class BlendInversionConfig(TriggerSearchConfig):
    """Neural Cleanse's settings where they mean the same (`common.TriggerSearchConfig`: lr, Adam,
    λ schedule, success threshold, rounds, anomaly threshold); the blend's own: `max_alpha`,
    `max_ratio`, and a shorter budget (docs/inversion.md, "Blend inversion", says where each
    default comes from). The trigger size here is α·H·W."""

    steps: int = Field(default=300, ge=1, le=100_000, description="Step budget: optimiser steps per class")
    early_stop_patience: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="Rounds without a better α (after λ went both up and down) before a class is frozen",
    )
    max_alpha: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Upper bound of the blend weight α: above 0.5 the pattern outweighs the image",
    )
    max_ratio: float = Field(
        default=0.6,
        gt=0,
        le=1,
        description="A flagged class's α must also be at most this share of the median class's α: an "
        "effect size, since tightly clustered classes give a tiny MAD that flags small differences",
    )


@dataclass
class _Optimised:
    alpha: Tensor  # (K,) best working α per class (last α where none worked)
    patterns: Tensor  # (K, C, H, W)
    lam: Tensor  # (K,)
    steps: Tensor  # (K,)
    converged: Tensor  # (K,) bool
    reached: Tensor  # (K,) bool


def _unit(raw: Tensor) -> Tensor:
    return (torch.tanh(raw) + 1) / 2


class BlendInversion(TriggerInverter):
    name = "blend-inversion"
    Config = BlendInversionConfig
    config: BlendInversionConfig
    meta = PluginMeta(
        summary="Per-class smallest whole-image blend (1 − α)·x + α·p; flags classes with outlying small α "
        "(global triggers: SIG, Blended)",
        paper="Neural Cleanse's objective (Wang et al. 2019) with the mask tied to one blend weight, the "
        "Blended injection of Chen et al. 2017; small universal perturbations as a backdoor sign, Xu et "
        "al., Universal Soldier, 2023",
        year=2023,
        url="https://arxiv.org/abs/2302.00747",
        threat_model="defender holds a small clean set; white-box gradients; trigger spread over the image. "
        "Its flags are candidates to look at, not a verdict: on clean Fashion-MNIST wrn-16-1 models it "
        "flagged natural classes (Shirt, Bag, Pullover) on two seeds of three (docs/inversion.md)",
    )
    conformance_config: ClassVar[dict[str, Any]] = {"steps": 5, "batch_size": 8, "eval_images": 16}

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        c = self.config
        known = classes is None and c.target is not None
        chosen = classes if classes is not None else [c.target] if c.target is not None else c.classes
        chosen = list(range(data.spec.num_classes)) if chosen is None else list(chosen)
        check_inputs(model, data, chosen, "Blend inversion")
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            with preferred_layout(model, model_device(model)):
                opt = self._optimise(model, data, chosen)
                h, w = data.spec.height, data.spec.width
                masks = opt.alpha.to(opt.patterns.device).view(-1, 1, 1, 1).expand(-1, 1, h, w).contiguous()
                success = attack_success(model, data, chosen, masks, opt.patterns, c.eval_images)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        norms = masks.flatten(1).sum(1).cpu()
        if known:
            index = torch.full((1,), float("nan"))
            flagged = list(chosen)
        else:
            index = anomaly_index(norms, log=c.log_norms)
            outliers = flag_targets(chosen, norms, index, c.threshold)
            median = float(torch.quantile(norms.double(), 0.5))
            flagged = [k for k in outliers if float(norms[chosen.index(k)]) <= c.max_ratio * median]
        diagnostics: dict[str, Any] = {
            "mode": "known-target" if known else "scan",
            "alpha": [round(float(a), 6) for a in opt.alpha],
            K.LAMBDA: opt.lam.tolist(),
            K.STEPS: opt.steps.tolist(),
            "converged": opt.converged.tolist(),
            "reached_threshold": opt.reached.tolist(),
            K.SCHEDULE_USED: "full",
            K.CLASS_STEPS: int(opt.steps.sum()),
            K.FULL_SCAN_CLASS_STEPS_BOUND: len(chosen) * c.steps,
            "threshold": c.threshold,
            "index_on": "log blend weight α" if c.log_norms else "blend weight α",
        }
        if not known and flagged != outliers:
            diagnostics["outliers_above_max_ratio"] = [k for k in outliers if k not in flagged]
        return InversionResult(
            classes=chosen,
            masks=masks.detach(),
            patterns=opt.patterns.detach(),
            mask_norms=norms,
            attack_success=success,
            anomaly_index=index,
            flagged=flagged,
            seconds=seconds,
            diagnostics=diagnostics,
        )

    def _init(self, cls: int, shape: tuple[int, int, int]) -> Tensor:
        """A class's own seeded pattern start in [0.05, 0.95], the same alone or in a batch."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + cls)
        return torch.atanh((2 * torch.rand(*shape, generator=gen) - 1) * 0.9)

    def _optimise(self, model: nn.Module, data: DefenseData, classes: list[int]) -> _Optimised:
        """Minimise CE(f((1 − α_k)·x + α_k·p_k), k) + λ_k·α_k·H·W for every class k at once.

        One forward pass per step on every active class's copy of the batch; Adam is written out so
        that a class frozen by early stopping leaves the batch without disturbing the others (the
        classes still in the batch have all taken the same number of steps, so one bias
        correction serves them all). λ_k is Neural Cleanse's schedule, per class.
        """
        c = self.config
        device = model_device(model)
        k = len(classes)
        shape = (data.spec.channels, data.spec.height, data.spec.width)
        hw = data.spec.height * data.spec.width
        raw_a = torch.zeros(k, device=device)  # α starts at max_alpha / 2
        raw_p = torch.stack([self._init(cls, shape) for cls in classes]).to(device)
        moments = [torch.zeros_like(t) for t in (raw_a, raw_a, raw_p, raw_p)]
        targets = torch.tensor(classes, device=device)
        schedule = LambdaSchedule.start(
            k, c.lambda_init, c.lambda_up, c.lambda_down, c.patience, c.success_threshold
        )
        active = torch.ones(k, dtype=torch.bool)
        steps = torch.zeros(k, dtype=torch.long)
        best_a = torch.full((k,), math.inf, dtype=torch.float64)
        best_p = _unit(raw_p).detach().clone()
        ref = torch.full((k,), math.inf, dtype=torch.float64)
        stall = torch.zeros(k, dtype=torch.long)
        round_hits = torch.zeros(k, dtype=torch.float64)
        last_hit = torch.zeros(k, dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.seed)
        train = data.train
        b1, b2 = ADAM_BETAS
        for step in range(c.steps):
            act = torch.nonzero(active).squeeze(1)
            if act.numel() == 0:
                break
            idx = torch.randint(0, len(train), (c.batch_size,), generator=gen)
            x = to_float(train.images[idx]).to(device)
            a_raw = raw_a[act].clone().requires_grad_(True)
            p_raw = raw_p[act].clone().requires_grad_(True)
            alpha = c.max_alpha * _unit(a_raw)
            pattern = _unit(p_raw)
            n = act.numel()
            masks = alpha.view(n, 1, 1, 1).expand(n, 1, *shape[1:])
            logits = model(stamp_all(x, masks, pattern))
            y = targets[act].repeat_interleave(x.shape[0])
            ce = F.cross_entropy(logits, y, reduction="none").view(n, -1).mean(1)
            lam = schedule.effective[act].to(device, alpha.dtype)
            loss = (ce + lam * alpha * hw).sum()
            g_a, g_p = torch.autograd.grad(loss, [a_raw, p_raw])
            with torch.no_grad():
                t = step + 1  # every active class has taken exactly `step` steps before this one
                for raw, grad, m1, m2 in (
                    (raw_a, g_a, moments[0], moments[1]),
                    (raw_p, g_p, moments[2], moments[3]),
                ):
                    m1[act] = b1 * m1[act] + (1 - b1) * grad
                    m2[act] = b2 * m2[act] + (1 - b2) * grad * grad
                    update = (m1[act] / (1 - b1**t)) / ((m2[act] / (1 - b2**t)).sqrt() + ADAM_EPS)
                    raw[act] = raw[act] - c.lr * update
                hit = (logits.argmax(1) == y).view(n, -1).float().mean(1).double().cpu()
            steps[act.cpu()] += 1
            round_hits[act.cpu()] += hit
            last_hit[act.cpu()] = hit
            if t % c.round_steps == 0 or t == c.steps:
                self._end_round(
                    c, act.cpu(), t, schedule, round_hits, last_hit, alpha.detach().double().cpu(),
                    pattern.detach(), best_a, best_p, ref, stall, active,
                )  # fmt: skip
        reached = torch.isfinite(best_a)
        last_alpha = (c.max_alpha * _unit(raw_a)).double().cpu()
        alpha_out = torch.where(reached, best_a, last_alpha).float()
        patterns = best_p.clone()
        never = torch.nonzero(~reached).squeeze(1).to(device)
        patterns[never] = _unit(raw_p[never])
        return _Optimised(
            alpha=alpha_out,
            patterns=patterns.detach(),
            lam=schedule.lam.float(),
            steps=steps,
            converged=~active,
            reached=reached,
        )

    @staticmethod
    def _end_round(
        c: BlendInversionConfig,
        act: Tensor,
        t: int,
        schedule: LambdaSchedule,
        round_hits: Tensor,
        last_hit: Tensor,
        alpha: Tensor,
        pattern: Tensor,
        best_a: Tensor,
        best_p: Tensor,
        ref: Tensor,
        stall: Tensor,
        active: Tensor,
    ) -> None:
        """Keep each class's smallest working α (the trigger of its latest step, which was actually
        evaluated), adapt λ, and freeze classes whose best α stopped improving (Neural Cleanse's rules)."""
        length = (t - 1) % c.round_steps + 1
        success = round_hits[act] / length
        works = (success >= c.success_threshold) & (last_hit[act] >= c.success_threshold)
        better = works & (alpha < best_a[act])
        rows = act[better]
        best_a[rows] = alpha[better]
        best_p[rows.to(best_p.device)] = pattern[better.to(pattern.device)]
        group = torch.zeros_like(active)
        group[act] = True
        full = torch.zeros(len(active), dtype=torch.float64)
        full[act] = success
        schedule.update(full, group)
        counting = group & schedule.explored
        improved = best_a < ref * (1 - c.early_stop_delta)
        ref[:] = torch.where(group & improved, best_a, ref)
        stall[:] = torch.where(counting, torch.where(improved, 0, stall + 1), stall)
        active &= ~(group & (stall >= c.early_stop_patience))
        round_hits[act] = 0
