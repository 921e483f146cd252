"""Neural Cleanse trigger inversion, with every candidate class optimised in one batched problem.

For each class y a mask m (1, H, W) and pattern p (C, H, W), both tanh-parametrised so they stay
in [0, 1], minimise CE(f((1 − m)·x + m·p), y) + λ_y·‖m‖₁ over the clean budget. The classes are
independent problems, so they are stacked: one step stamps every clean image once per active
class and runs the frozen model once on all copies. Adam is applied row by row with a per-class
step count and each class has its own λ, so a class follows exactly the trajectory it would
follow alone; a class whose best norm stops improving is frozen and leaves the batch.

That independence also makes a scheduled scan possible (`schedule="k-arm"`, after K-Arm, Shen et
al., ICML 2021): a pre-screen on clean images names the likely targets, every class gets a short
batched warm-up, then an ε-greedy bandit hands one round at a time to the most promising class and
stops for good the classes whose trigger is already far larger than the smallest one. A class's
trajectory is the same under either schedule; the scheduled scan only stops some classes sooner.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from backdoor_toolkit import (
    DefenseData,
    ImageClassifier,
    ImageData,
    InversionKeys,
    InversionResult,
    PluginMeta,
    Preset,
    TriggerInverter,
    anomaly_index,
    flag_targets,
    preferred_layout,
    stamp_all,
    to_float,
)

from .common import TriggerSearchConfig, attack_success, check_inputs, model_device
from .schedule import LambdaSchedule

ADAM_BETAS = (0.5, 0.9)  # as in the Neural Cleanse paper's implementation notes
ADAM_EPS = 1e-8
INIT_SPREAD = 0.9  # initial mask/pattern uniform in [0.05, 0.95]: keeps tanh out of saturation
K = InversionKeys  # the diagnostic keys every reader of an InversionResult looks up


class NeuralCleanseConfig(TriggerSearchConfig):
    """The shared search settings (`common.TriggerSearchConfig`, Neural Cleanse's own defaults) and
    the batching and K-Arm schedule options."""

    batched: bool = Field(
        default=True,
        description="One batched problem for all classes (False: one class per forward pass, as a "
        "per-class loop)",
    )
    schedule: Literal["full", "k-arm"] = Field(
        default="full",
        description="Which classes get steps: all until each is done (full), or a K-Arm pre-screen, "
        "warm-up and ε-greedy bandit that stops classes which cannot win (k-arm)",
    )
    prescreen_top_k: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="k-arm: runner-up classes counted per clean image (default: 2 up to 8 classes, "
        "else round(0.25·K), at most K − 2)",
    )
    prescreen_ratio: float = Field(
        default=2.0,
        gt=1,
        le=100,
        description="k-arm: a pre-screen candidate is a runner-up at least this many times as often "
        "as the median class",
    )
    warmup_steps: int = Field(
        default=50,
        ge=1,
        le=100_000,
        description="k-arm: steps every class takes, batched, before the bandit (a multiple of "
        "round_steps, below steps)",
    )
    drop_ratio: float = Field(
        default=4.0,
        gt=1,
        le=1000,
        description="k-arm: a class whose best mask norm exceeds this many times the smallest is "
        "stopped (once its λ went both up and down)",
    )
    epsilon: float = Field(
        default=0.3, ge=0, le=1, description="k-arm: share of bandit rounds given to a random alive class"
    )
    decisive_index: float = Field(
        default=3.0,
        gt=0,
        le=100,
        description="k-arm: anomaly index the top-ranked class must reach for the scheduled scan to "
        "decide alone; below it the dropped classes are run to the end, which gives the full scan's result",
    )
    drop_after: float = Field(
        default=1.5,
        ge=1,
        le=100,
        description="k-arm: a class may be stopped once it has taken this many times warmup_steps "
        "(by then its norm ranks as in the full scan)",
    )

    @model_validator(mode="after")
    def _schedule_can_act(self) -> NeuralCleanseConfig:
        """A k-arm warm-up that spans the whole budget would be a full scan that claims otherwise."""
        if self.schedule == "k-arm":
            # asked for explicitly it is an error; a small `steps` alone runs the full scan, and says so
            if "warmup_steps" in self.model_fields_set and self.warmup_steps >= self.steps:
                raise ValueError(
                    f"schedule='k-arm' needs warmup_steps ({self.warmup_steps}) below steps "
                    f"({self.steps}): otherwise every class spends its whole budget in the warm-up "
                    "and no class can be stopped early; lower warmup_steps or use schedule='full'"
                )
            if self.warmup_steps % self.round_steps:
                raise ValueError(
                    f"schedule='k-arm' needs warmup_steps ({self.warmup_steps}) to be a multiple of "
                    f"round_steps ({self.round_steps}): the bandit hands out whole rounds"
                )
        return self


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


class _Scan:
    """The optimisation state of every class of one scan, advanced one round at a time.

    Each class keeps its own raw mask and pattern, Adam moments and step count, λ schedule,
    best/last/reference norms, stall counter and round success, and a class at its own step j
    always uses batch j of one seeded sequence (drawn lazily, in order, from one generator). So
    any group of classes at the same step count can be advanced together, and a class's trajectory
    does not depend on which classes share its steps or on when it gets them: the full scan (all
    classes together), the per-class loop and the scheduled scan follow the same per-class
    trajectories, and the full scan's numbers are those of one global loop over steps.
    """

    def __init__(
        self,
        config: NeuralCleanseConfig,
        seed: int,
        model: nn.Module,
        train: ImageData,
        classes: list[int],
        starts: list[tuple[Tensor, Tensor]],
    ) -> None:
        c = self.config = config
        self.model, self.train = model, train
        device = self.device = model_device(model)
        k = self.k = len(classes)
        self.raw_m = torch.stack([s[0] for s in starts]).to(device)
        self.raw_p = torch.stack([s[1] for s in starts]).to(device)
        self.moments = [torch.zeros_like(t) for t in (self.raw_m, self.raw_m, self.raw_p, self.raw_p)]
        self.t_adam = torch.zeros(k, device=device)
        self.targets = torch.tensor(classes, device=device)
        self.schedule = LambdaSchedule.start(
            k, c.lambda_init, c.lambda_up, c.lambda_down, c.patience, c.success_threshold
        )
        self.active = torch.ones(k, dtype=torch.bool)  # False once frozen by early stopping
        self.steps = torch.zeros(k, dtype=torch.long)
        self.best_m, self.best_p = _to_unit(self.raw_m).clone(), _to_unit(self.raw_p).clone()
        self.best_norm = torch.full((k,), math.inf, dtype=torch.float64)
        self.ref_norm = torch.full((k,), math.inf, dtype=torch.float64)
        self.stall = torch.zeros(k, dtype=torch.long)
        self.round_success = torch.zeros(k, dtype=torch.float64)
        # the trigger of each class's latest step
        self.last_m, self.last_p = self.best_m.clone(), self.best_p.clone()
        self.last_hit = torch.zeros(k, dtype=torch.float64)
        self.last_norm = torch.full((k,), math.inf, dtype=torch.float64)
        self._gen = torch.Generator().manual_seed(seed)
        self._batches: list[Tensor] = []

    def runnable(self) -> Tensor:
        """(K,) bool: classes neither frozen by early stopping nor out of step budget."""
        return self.active & (self.steps < self.config.steps)

    def batch(self, j: int) -> Tensor:
        """Indices of the clean images of step j, the same for every class that reaches step j."""
        while len(self._batches) <= j:
            self._batches.append(
                torch.randint(0, len(self.train), (self.config.batch_size,), generator=self._gen)
            )
        return self._batches[j]

    def advance(self, group: Sequence[int]) -> None:
        """One round (fewer steps where the budget ends first) for `group`, positions of runnable
        classes at the same step count; they share each step's batch and forward pass."""
        c = self.config
        act = torch.tensor(sorted(group), dtype=torch.long)
        start = int(self.steps[act[0]])
        if not bool(self.runnable()[act].all()) or bool((self.steps[act] != start).any()):
            raise RuntimeError("internal: a group must hold runnable classes at one step count")
        act_d = act.to(self.device)
        for j in range(start, min(start + c.round_steps, c.steps)):
            x = to_float(self.train.images[self.batch(j)]).to(self.device)
            wm = self.raw_m[act_d].requires_grad_(True)
            wp = self.raw_p[act_d].requires_grad_(True)
            m, p = _to_unit(wm), _to_unit(wp)
            logits = self.model(stamp_all(x, m, p)).view(act.numel(), x.shape[0], -1)
            y = self.targets[act_d].unsqueeze(1).expand(-1, x.shape[0])
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(1)
            norms = m.flatten(1).sum(1)
            lam = self.schedule.effective[act].to(self.device, norms.dtype)
            grad_m, grad_p = torch.autograd.grad((ce + lam * norms).sum(), [wm, wp])
            self.t_adam[act_d] += 1
            for raw, g, m1, m2 in (
                (self.raw_m, grad_m, self.moments[0], self.moments[1]),
                (self.raw_p, grad_p, self.moments[2], self.moments[3]),
            ):
                m1[act_d] = ADAM_BETAS[0] * m1[act_d] + (1 - ADAM_BETAS[0]) * g
                m2[act_d] = ADAM_BETAS[1] * m2[act_d] + (1 - ADAM_BETAS[1]) * g * g
                t = self.t_adam[act_d].view(-1, 1, 1, 1)
                m_hat = m1[act_d] / (1 - ADAM_BETAS[0] ** t)
                v_hat = m2[act_d] / (1 - ADAM_BETAS[1] ** t)
                raw[act_d] = raw[act_d] - c.lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
            self.steps[act] += 1
            hits = (logits.detach().argmax(-1) == y).double().mean(1).cpu()
            self.round_success[act] += hits
            self.last_m[act_d], self.last_p[act_d] = m.detach(), p.detach()
            self.last_hit[act], self.last_norm[act] = hits, norms.detach().double().cpu()
        if int(self.steps[act[0]]) % c.round_steps == 0:  # a budget ending mid-round decides nothing
            self._end_round(act)

    def _end_round(self, act: Tensor) -> None:
        """Keep a better working trigger, adapt λ and count stalled rounds for the classes `act`."""
        c = self.config
        group = torch.zeros(self.k, dtype=torch.bool)
        group[act] = True
        success = self.round_success / c.round_steps
        # keep the trigger that was actually evaluated: it worked on the round and its own step
        works = (success >= c.success_threshold) & (self.last_hit >= c.success_threshold)
        better = group & works & (self.last_norm < self.best_norm)
        if bool(better.any()):
            b = torch.nonzero(better).squeeze(1).to(self.device)
            self.best_m[b], self.best_p[b] = self.last_m[b], self.last_p[b]
            self.best_norm = torch.where(better, self.last_norm, self.best_norm)
        self.schedule.update(success, group)
        # as in Neural Cleanse, only a class whose λ went both up and down may stop early
        counting = group & torch.isfinite(self.best_norm) & self.schedule.explored
        improved = self.best_norm < self.ref_norm * (1 - c.early_stop_delta)
        self.ref_norm = torch.where(group & improved, self.best_norm, self.ref_norm)
        self.stall = torch.where(counting, torch.where(improved, 0, self.stall + 1), self.stall)
        self.active = self.active & ~(group & (self.stall >= c.early_stop_patience))
        self.round_success[act] = 0

    def run_to_end(self, batched: bool) -> None:
        """Every runnable class until frozen or out of budget, whatever step count it is at: the
        classes furthest behind go first, so groups meet at one step count and advance together
        (batched) or one class per forward pass (not batched). From a fresh scan this is the full
        scan; after the bandit it completes the classes it dropped. Since a class's trajectory does
        not depend on its company or its turn, both give the full scan's per-class results."""
        while bool((run := self.runnable()).any()):
            behind = int(self.steps[run].min())
            group = torch.nonzero(run & (self.steps == behind)).squeeze(1).tolist()
            if batched:
                self.advance(group)
            else:
                for i in group:
                    self.advance([i])

    def result(self) -> _Optimised:
        reached = torch.isfinite(self.best_norm)
        best_m, best_p = self.best_m.clone(), self.best_p.clone()
        # a class that never reached the threshold keeps its last state: the best it could do
        last = torch.nonzero(~reached).squeeze(1).to(self.device)
        best_m[last], best_p[last] = _to_unit(self.raw_m[last]), _to_unit(self.raw_p[last])
        return _Optimised(
            masks=best_m.detach(),
            patterns=best_p.detach(),
            lam=self.schedule.lam.float(),
            steps=self.steps.clone(),
            converged=~self.active,
            reached=reached,
        )


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
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(
            values={"log_norms": False},
            description="Wang et al. 2019's anomaly index on raw mask norms (optimisation keeps bdtk's step "
            "budget)",
        ),
        "k-arm": Preset(
            values={"schedule": "k-arm"},
            description="Scheduled scan after K-Arm (Shen et al. 2021): pre-screen, warm-up, bandit over "
            "classes; far fewer class-steps",
        ),
    }

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
        # the schedule searches for the target among all classes; given classes are inverted in full
        given = classes is not None or c.target is not None or c.classes is not None
        try:
            with preferred_layout(model, model_device(model)):
                opt, info = self._optimise(model, data, chosen, c.schedule == "k-arm" and not given)
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
            if info.get(K.DROPPED):
                # a dropped class stopped because it cannot win, with its norm still shrinking: it is
                # never a target, only a member of the statistics the target is an outlier from
                info["flagged_before_drops"] = flagged
                flagged = [k for k in flagged if k not in info[K.DROPPED]]
        if c.schedule == "k-arm" and given:
            info[K.SCHEDULE_USED] = "full (known target)" if known else "full (classes given)"
        diagnostics: dict[str, Any] = {
            "mode": "known-target" if known else "scan",
            "batched": c.batched,
            "schedule": c.schedule,
            **info,
            K.LAMBDA: opt.lam.tolist(),
            K.STEPS: opt.steps.tolist(),
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
        check_inputs(model, data, classes, "Neural Cleanse")

    # --- optimisation ------------------------------------------------------------------------

    def _init(self, cls: int, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """A class's own seeded start, identical whether it is optimised alone or in a batch."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + cls)
        c, h, w = shape
        return _from_unit(torch.rand(1, h, w, generator=gen)), _from_unit(torch.rand(c, h, w, generator=gen))

    def _optimise(
        self, model: nn.Module, data: DefenseData, classes: list[int], scheduled: bool
    ) -> tuple[_Optimised, dict[str, Any]]:
        """The scan's triggers and how its steps were scheduled (diagnostics)."""
        c = self.config
        shape = tuple(data.train.images.shape[1:])
        starts = [self._init(cls, shape) for cls in classes]  # type: ignore[arg-type]
        scan = _Scan(c, self.seed, model, data.train, classes, starts)
        info: dict[str, Any] = {"prescreen_scores": None, "prescreen_top_k": None, K.CANDIDATES: None}
        dropped: dict[int, int] = {}  # class → its step count when stopped as unable to win
        if not scheduled or c.warmup_steps >= c.steps:
            scan.run_to_end(c.batched)
            used = "full" if not scheduled else "full (budget within the warm-up)"
        else:
            scores, top_k = self._prescreen(model, data.train, data.spec.num_classes)
            chosen = scores[classes]
            median = float(torch.quantile(scores.double(), 0.5))
            candidate = (chosen > 0) & (chosen >= c.prescreen_ratio * median)
            info = {
                "prescreen_scores": [round(v, 4) for v in chosen.tolist()],
                "prescreen_top_k": top_k,
                K.CANDIDATES: [cls for cls, yes in zip(classes, candidate.tolist(), strict=True) if yes],
            }
            n = int(candidate.sum())
            if n == 0 or n > len(classes) / 2:
                scan.run_to_end(c.batched)
                used = "full (pre-screen ambiguous)"
            else:
                dropped = self._bandit(scan, classes, chosen)
                used = "k-arm"
                provisional = self._top_index(scan)
                info["k_arm_top_index"] = round(provisional, 4)
                if provisional < c.decisive_index:
                    # not decisive: the dropped classes' norms are upper bounds that widen the
                    # statistics; running them on makes every class's result the full scan's
                    info["dropped_then_completed"] = dropped
                    dropped = {}
                    scan.run_to_end(c.batched)
                    used = "k-arm, completed (not decisive)"
        opt = scan.result()
        info.update(
            {
                K.SCHEDULE_USED: used,
                K.DROPPED: dropped,
                K.CLASS_STEPS: int(opt.steps.sum()),
                K.FULL_SCAN_CLASS_STEPS_BOUND: len(classes) * c.steps,
            }
        )
        return opt, info

    # --- the scheduled scan (K-Arm) -----------------------------------------------------------

    def _top_k(self, num_classes: int) -> int:
        """K-Arm's rule (2 up to 8 classes, else round(0.25·K)) or the configured k; at most K − 2,
        since with K − 1 every other class is in every top-k and the scores cannot differ."""
        k = self.config.prescreen_top_k
        if k is None:
            k = 2 if num_classes <= 8 else round(0.25 * num_classes)
        return max(1, min(k, num_classes - 2))

    @torch.no_grad()
    def _prescreen(self, model: nn.Module, train: ImageData, num: int) -> tuple[Tensor, int]:
        """Per class, the share of clean images of the other classes that rank it among their
        top-k classes other than their own: a backdoor target is a runner-up for far more images
        than any natural class (K-Arm's arm pre-screening). One forward pass, no gradients."""
        k = self._top_k(num)
        device = model_device(model)
        counts = torch.zeros(num, dtype=torch.float64)
        others = torch.zeros(num, dtype=torch.float64)
        every = torch.arange(num)
        for s in range(0, len(train), 512):
            labels = train.labels[s : s + 512]
            logits = model(to_float(train.images[s : s + 512]).to(device)).double().cpu()
            logits[torch.arange(len(labels)), labels] = -math.inf
            inside = torch.zeros_like(logits, dtype=torch.bool)
            inside.scatter_(1, logits.topk(k, dim=1).indices, True)
            other = labels.unsqueeze(1) != every.unsqueeze(0)
            counts += (inside & other).sum(0)
            others += other.sum(0)
        return counts / others.clamp_min(1), k

    def _top_index(self, scan: _Scan) -> float:
        """The anomaly index of the smallest mask under the scan's current (provisional) norms."""
        norms = scan.result().masks.flatten(1).sum(1)
        index = anomaly_index(norms, log=self.config.log_norms)
        return float(index[int(torch.argmin(norms))])

    def _bandit(self, scan: _Scan, classes: list[int], scores: Tensor) -> dict[int, int]:
        """Warm up every class, then give one round at a time to one alive class, ε-greedily;
        return the classes stopped as unable to win, with the step count at which they stopped.

        Alive: not frozen by early stopping, budget left, and able to win. After the warm-up a class
        cannot win once its trigger does not work while another's does, or its best working mask
        norm exceeds `drop_ratio` × the smallest one and its λ has gone both up and down (NC's own
        sign that its mask was squeezed to its limit). A dropped class is never flagged: its norm
        is an upper bound of what the full scan would reach (best norms only decrease), taken while
        it still shrinks, and only enters the anomaly statistics the winner is an outlier from.
        The greedy choice is the smallest best norm (ties, and classes without a working trigger,
        by pre-screen score): driving the smallest norm down first is what lets the others be
        dropped.
        """
        c = self.config
        for _ in range(c.warmup_steps // c.round_steps):
            run = torch.nonzero(scan.runnable()).squeeze(1).tolist()
            if not run:
                break
            if c.batched:
                scan.advance(run)
            else:
                for i in run:
                    scan.advance([i])
        dropped: dict[int, int] = {}
        stopped = torch.zeros(scan.k, dtype=torch.bool)
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            alive = scan.runnable() & ~stopped
            smallest = float(scan.best_norm.min())
            if math.isfinite(smallest):
                works = torch.isfinite(scan.best_norm)
                young = scan.steps < c.drop_after * c.warmup_steps
                far = works & (scan.best_norm > c.drop_ratio * smallest) & scan.schedule.explored
                lose = alive & ~young & (far | ~works)
                for i in torch.nonzero(lose).squeeze(1).tolist():
                    dropped[classes[i]] = int(scan.steps[i])
                stopped |= lose
                alive &= ~lose
            pool = torch.nonzero(alive).squeeze(1).tolist()
            if not pool:
                return dropped
            if float(torch.rand((), generator=gen)) < c.epsilon:
                pick = pool[int(torch.randint(len(pool), (), generator=gen))]
            else:
                pick = min(pool, key=lambda i: (float(scan.best_norm[i]), -float(scores[i]), i))
            scan.advance([pick])

    # --- evaluation --------------------------------------------------------------------------

    def _attack_success(
        self, model: nn.Module, data: DefenseData, classes: list[int], masks: Tensor, patterns: Tensor
    ) -> Tensor:
        """Share of clean images of other classes (val part, else train) each trigger sends to its class."""
        return attack_success(model, data, classes, masks, patterns, self.config.eval_images)
