"""Neural Cleanse trigger inversion, with every candidate class optimised in one batched problem.

For each class y a mask m (1, H, W) and pattern p (C, H, W), both tanh-parametrised so they stay
in [0, 1], minimise CE(f((1 − m)·x + m·p), y) + λ_y·‖m‖₁ over the clean budget. The classes are
independent problems, so they are stacked: one step stamps every clean image once per active
class and runs the frozen model once on all copies. Adam is applied row by row with a per-class
step count and each class has its own λ, so a class follows exactly the trajectory it would
follow alone; a class whose best norm stops improving is frozen and leaves the batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import (
    BdtkError,
    DefenseData,
    ImageClassifier,
    ImageData,
    InversionResult,
    PluginMeta,
    StrictConfig,
    TriggerInverter,
    to_float,
)

from .anomaly import anomaly_index, flag_targets
from .schedule import LambdaSchedule

ADAM_BETAS = (0.5, 0.9)  # as in the Neural Cleanse paper's implementation notes
ADAM_EPS = 1e-8
INIT_SPREAD = 0.9  # initial mask/pattern uniform in [0.05, 0.95]: keeps tanh out of saturation


class NeuralCleanseConfig(StrictConfig):
    target: int | None = Field(
        default=None, ge=0, description="Known target class: invert only it and skip the scan"
    )
    classes: list[int] | None = Field(
        default=None, min_length=1, description="Invert only these classes (default: all)"
    )
    steps: int = Field(default=500, ge=1, le=100_000, description="Step budget: optimiser steps per class")
    batch_size: int = Field(
        default=32, ge=1, le=4096, description="Clean images per step (each stamped once per active class)"
    )
    lr: float = Field(default=0.1, gt=0, le=10, description="Adam learning rate in tanh space")
    lambda_init: float = Field(
        default=1e-2, ge=0, le=10, description="Initial weight λ of the mask's L1 norm"
    )
    lambda_up: float = Field(default=1.5, gt=1, le=10, description="Factor λ is multiplied by when raised")
    lambda_down: float = Field(
        default=1.5**1.5, gt=1, le=10, description="Factor λ is divided by when lowered"
    )
    success_threshold: float = Field(
        default=0.99, gt=0, le=1, description="Attack success a trigger must reach to count as working"
    )
    round_steps: int = Field(
        default=5, ge=1, le=10_000, description="Steps per round; λ and early stopping are decided per round"
    )
    patience: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Rounds in a row above (below) the threshold before λ goes up (down)",
    )
    early_stop_patience: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="Rounds without a better norm (after λ went both up and down) before a class is frozen",
    )
    early_stop_delta: float = Field(
        default=0.01, ge=0, lt=1, description="Relative norm decrease that counts as an improvement"
    )
    threshold: float = Field(
        default=2.0, gt=0, le=100, description="Anomaly index above which a below-median class is flagged"
    )
    log_norms: bool = Field(
        default=True, description="Anomaly index on log mask norms (False: on the norms, as in the paper)"
    )
    eval_images: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Clean images (val part) on which attack success is measured",
    )
    batched: bool = Field(
        default=True, description="One batched problem for all classes (False: one class after another)"
    )


@dataclass
class _Optimised:
    """What the optimisation returns for a list of classes, before the anomaly test."""

    masks: Tensor  # (K, 1, H, W)
    patterns: Tensor  # (K, C, H, W)
    lam: Tensor  # (K,)
    steps: Tensor  # (K,) steps each class took
    converged: Tensor  # (K,) bool: frozen by early stopping before the budget ran out
    reached: Tensor  # (K,) bool: some round reached the success threshold


def _to_unit(raw: Tensor) -> Tensor:
    return (torch.tanh(raw) + 1) / 2


def _from_unit(u: Tensor) -> Tensor:
    return torch.atanh((2 * u - 1) * INIT_SPREAD)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def stamp_all(images: Tensor, masks: Tensor, patterns: Tensor) -> Tensor:
    """Every image stamped with every trigger: (B, C, H, W) × K triggers → (K·B, C, H, W)."""
    m, p = masks.unsqueeze(1), patterns.unsqueeze(1)
    return ((1 - m) * images.unsqueeze(0) + m * p).flatten(0, 1)


class NeuralCleanse(TriggerInverter):
    name = "neural-cleanse"
    Config = NeuralCleanseConfig
    config: NeuralCleanseConfig
    meta = PluginMeta(
        summary="Per-class minimal mask/pattern triggers; flags classes with outlying small norms",
        paper="Wang et al., Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
        year=2019,
        url="https://doi.org/10.1109/SP.2019.00031",
        threat_model="defender holds a small clean set; white-box gradients; trigger is a patch or blend",
    )
    conformance_config: ClassVar[dict[str, Any]] = {"steps": 5, "batch_size": 8, "eval_images": 16}

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        c = self.config
        known = classes is None and c.target is not None
        chosen = classes if classes is not None else [c.target] if c.target is not None else c.classes
        chosen = list(range(data.spec.num_classes)) if chosen is None else list(chosen)
        self._check(model, data, chosen)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            if c.batched:
                opt = self._optimise(model, data.train, chosen)
            else:
                parts = [self._optimise(model, data.train, [k]) for k in chosen]
                opt = _Optimised(
                    *(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(_Optimised))
                )
            success = self._attack_success(model, data, chosen, opt.masks, opt.patterns)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        norms = opt.masks.flatten(1).sum(1)
        if known:
            index = torch.full((1,), float("nan"))
            flagged = list(chosen)
        else:
            index = anomaly_index(norms, log=c.log_norms)
            flagged = flag_targets(chosen, norms, index, c.threshold)
        diagnostics: dict[str, Any] = {
            "mode": "known-target" if known else "scan",
            "batched": c.batched,
            "lambda": opt.lam.tolist(),
            "steps": opt.steps.tolist(),
            "converged": opt.converged.tolist(),
            "reached_threshold": opt.reached.tolist(),
            "threshold": c.threshold,
            "index_on": "log mask norms" if c.log_norms else "mask norms",
        }
        return InversionResult(
            classes=chosen,
            masks=opt.masks,
            patterns=opt.patterns,
            mask_norms=norms,
            attack_success=success,
            anomaly_index=index,
            flagged=flagged,
            seconds=seconds,
            diagnostics=diagnostics,
        )

    # --- checks ------------------------------------------------------------------------------

    def _check(self, model: nn.Module, data: DefenseData, classes: list[int]) -> None:
        """Fail with one clear message before any optimisation starts."""
        spec = data.spec
        if len(data.train) == 0:
            raise BdtkError("Neural Cleanse needs clean images, but the defender's training part is empty.")
        spec.check_images(data.train.images)
        if len(data.val):
            spec.check_images(data.val.images)
        bad = [k for k in classes if not 0 <= k < spec.num_classes]
        if bad:
            raise BdtkError(
                f"Class index {bad[0]} is out of range for {spec.name!r}, which has classes "
                f"0–{spec.num_classes - 1}."
            )
        if len(set(classes)) != len(classes):
            raise BdtkError(f"Classes to invert contain duplicates: {classes}.")
        device = model_device(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(to_float(data.train.images[:2]).to(device))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BdtkError(
                f"The model fails on images of shape {tuple(data.train.images.shape[1:])}: {first}"
            ) from None
        finally:
            model.train(was_training)
        if logits.dim() != 2 or logits.shape[1] != spec.num_classes:
            raise BdtkError(
                f"The model returns logits of shape {tuple(logits.shape)}, but {spec.name!r} has "
                f"{spec.num_classes} classes: expected (N, {spec.num_classes})."
            )

    # --- optimisation ------------------------------------------------------------------------

    def _init(self, cls: int, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """A class's own seeded start, identical whether it is optimised alone or in a batch."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + cls)
        c, h, w = shape
        return _from_unit(torch.rand(1, h, w, generator=gen)), _from_unit(torch.rand(c, h, w, generator=gen))

    def _optimise(self, model: nn.Module, train: ImageData, classes: list[int]) -> _Optimised:
        c = self.config
        device = model_device(model)
        k = len(classes)
        shape = tuple(train.images.shape[1:])
        starts = [self._init(cls, shape) for cls in classes]  # type: ignore[arg-type]
        raw_m = torch.stack([s[0] for s in starts]).to(device)
        raw_p = torch.stack([s[1] for s in starts]).to(device)
        moments = [torch.zeros_like(t) for t in (raw_m, raw_m, raw_p, raw_p)]
        t_adam = torch.zeros(k, device=device)
        targets = torch.tensor(classes, device=device)
        schedule = LambdaSchedule.start(
            k, c.lambda_init, c.lambda_up, c.lambda_down, c.patience, c.success_threshold
        )
        active = torch.ones(k, dtype=torch.bool)
        steps = torch.zeros(k, dtype=torch.long)
        best_m, best_p = _to_unit(raw_m).clone(), _to_unit(raw_p).clone()
        best_norm = torch.full((k,), math.inf, dtype=torch.float64)
        ref_norm = torch.full((k,), math.inf, dtype=torch.float64)
        stall = torch.zeros(k, dtype=torch.long)
        round_success = torch.zeros(k, dtype=torch.float64)
        last_m, last_p = best_m.clone(), best_p.clone()  # the trigger of each class's latest step
        last_hit = torch.zeros(k, dtype=torch.float64)
        last_norm = torch.full((k,), math.inf, dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.seed)
        n = len(train)
        for step in range(c.steps):
            if not bool(active.any()):
                break
            idx = torch.randint(0, n, (c.batch_size,), generator=gen)
            x = to_float(train.images[idx]).to(device)
            act = torch.nonzero(active).squeeze(1)
            act_d = act.to(device)
            wm = raw_m[act_d].requires_grad_(True)
            wp = raw_p[act_d].requires_grad_(True)
            m, p = _to_unit(wm), _to_unit(wp)
            logits = model(stamp_all(x, m, p)).view(act.numel(), x.shape[0], -1)
            y = targets[act_d].unsqueeze(1).expand(-1, x.shape[0])
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(1)
            norms = m.flatten(1).sum(1)
            lam = schedule.effective[act].to(device, norms.dtype)
            grad_m, grad_p = torch.autograd.grad((ce + lam * norms).sum(), [wm, wp])
            t_adam[act_d] += 1
            for raw, g, m1, m2 in (
                (raw_m, grad_m, moments[0], moments[1]),
                (raw_p, grad_p, moments[2], moments[3]),
            ):
                m1[act_d] = ADAM_BETAS[0] * m1[act_d] + (1 - ADAM_BETAS[0]) * g
                m2[act_d] = ADAM_BETAS[1] * m2[act_d] + (1 - ADAM_BETAS[1]) * g * g
                t = t_adam[act_d].view(-1, 1, 1, 1)
                m_hat = m1[act_d] / (1 - ADAM_BETAS[0] ** t)
                v_hat = m2[act_d] / (1 - ADAM_BETAS[1] ** t)
                raw[act_d] = raw[act_d] - c.lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
            steps[act] += 1
            hits = (logits.detach().argmax(-1) == y).double().mean(1).cpu()
            round_success[act] += hits
            last_m[act_d], last_p[act_d] = m.detach(), p.detach()
            last_hit[act], last_norm[act] = hits, norms.detach().double().cpu()
            if (step + 1) % c.round_steps:
                continue
            success = round_success / c.round_steps
            # keep the trigger that was actually evaluated: it worked on the round and its own step
            works = (success >= c.success_threshold) & (last_hit >= c.success_threshold)
            better = active & works & (last_norm < best_norm)
            if bool(better.any()):
                b = torch.nonzero(better).squeeze(1).to(device)
                best_m[b], best_p[b] = last_m[b], last_p[b]
                best_norm = torch.where(better, last_norm, best_norm)
            schedule.update(success, active)
            # as in Neural Cleanse, only a class whose λ went both up and down may stop early
            counting = active & torch.isfinite(best_norm) & schedule.explored
            improved = best_norm < ref_norm * (1 - c.early_stop_delta)
            ref_norm = torch.where(active & improved, best_norm, ref_norm)
            stall = torch.where(counting, torch.where(improved, 0, stall + 1), stall)
            active = active & (stall < c.early_stop_patience)
            round_success.zero_()
        reached = torch.isfinite(best_norm)
        # a class that never reached the threshold keeps its last state: the best it could do
        last = torch.nonzero(~reached).squeeze(1).to(device)
        best_m[last], best_p[last] = _to_unit(raw_m[last]), _to_unit(raw_p[last])
        return _Optimised(
            masks=best_m.detach(),
            patterns=best_p.detach(),
            lam=schedule.lam.float(),
            steps=steps,
            converged=~active,
            reached=reached,
        )

    # --- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def _attack_success(
        self, model: nn.Module, data: DefenseData, classes: list[int], masks: Tensor, patterns: Tensor
    ) -> Tensor:
        """Share of clean images of other classes (val part, else train) each trigger sends to its class."""
        pool = data.val if len(data.val) else data.train
        images, labels = pool.images[: self.config.eval_images], pool.labels[: self.config.eval_images]
        device = model_device(model)
        targets = torch.tensor(classes)
        hits = torch.zeros(len(classes))
        counts = torch.zeros(len(classes))
        chunk = max(1, 4096 // len(classes))
        for s in range(0, len(labels), chunk):
            x = to_float(images[s : s + chunk]).to(device)
            y = labels[s : s + chunk]
            pred = model(stamp_all(x, masks, patterns)).argmax(1).view(len(classes), -1).cpu()
            victim = y.unsqueeze(0) != targets.unsqueeze(1)
            hits += ((pred == targets.unsqueeze(1)) & victim).sum(1)
            counts += victim.sum(1)
        return hits / counts.clamp_min(1)
