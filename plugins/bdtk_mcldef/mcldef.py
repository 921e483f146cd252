"""MCLDef (Yue et al., 2022): recover the trigger, then unlearn it by model-contrastive learning.

Stage 1 asks a trigger inverter from the registry, by name, for each class's trigger and for the
classes it flags as backdoor targets. Stage 2 fine-tunes the model with the model-contrastive
loss alone (see `loss.py`): every clean batch is stamped with the recovered trigger(s), and the
trainable model's feature of the triggered input is pulled towards the frozen backdoored model's
feature of the clean input and pushed away from its feature of the triggered input.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor
from torch.nn import functional as F
from torch.optim import Optimizer

from backdoor_toolkit import (
    ADDED_FIELD,
    BdtkError,
    Capability,
    ConfigError,
    DefenseData,
    ImageClassifier,
    ImageData,
    InversionResult,
    MaskTrigger,
    PluginMeta,
    Preset,
    PurificationResult,
    Purifier,
    StrictConfig,
    TriggerInverter,
    accuracy,
    augment_batch,
    create_inverter,
    iterate_batches,
    predict,
    preferred_layout,
    preferred_memory_format,
    stamp,
    to_float,
)

from .inverters import FLAGGED_BY, INVERTERS_SKIPPED, MERGE_KEYS, TRIGGER_FROM, combine
from .loss import FrozenReference, model_contrastive_loss


class DegenerateTriggerWarning(UserWarning):
    """A recovered trigger is empty or does not fire; MCLDef refuses to purify with it."""


def _error_detail(exc: Exception) -> str:
    """An inverter's error in words: bdtk's own message as it stands, anything else with its type."""
    return str(exc) if isinstance(exc, BdtkError) else f"{type(exc).__name__}: {exc}"


class InverterFailedError(BdtkError):
    """An inverter of stage 1 raised: the purification fails, naming it, and never goes on with the
    other inverters' results as if the scan were complete (the failed one may have been the only one
    to see the backdoor)."""


#: One inverter of a list: NAME or NAME:PRESET.
Choice = Annotated[str, Field(min_length=1)]


def recalibrate_batchnorm(
    model: ImageClassifier, images: Tensor, batch_size: int, device: torch.device
) -> None:
    """Replace every BatchNorm's running statistics by their plain average over `images` (one pass
    in train mode, no gradient): what the model normalises with at test time then comes from clean
    images only, not from the clean/triggered mixture of the purification batches."""
    bns = model.batchnorms()
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the pass
    model.train()
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                model(to_float(images[start : start + batch_size]).to(device))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.eval()


class MCLDefConfig(StrictConfig):
    inverter: Choice | Annotated[list[Choice], Field(min_length=1)] = Field(
        default="neural-cleanse:k-arm",
        description="Registered trigger inverter, NAME or NAME:PRESET (default: Neural Cleanse's "
        "scheduled scan), or a list of them: each scans, their flagged classes are united",
    )
    inverter_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Config values passed to the inverter's own Config; with a list of inverters, a "
        "mapping from each listed inverter (as written there) to its values",
    )
    inverter_mode: Literal["union", "fallback"] = Field(
        default="union",
        description="With a list of inverters: every one scans and their flags are united (union), or "
        "they scan in order and the next runs only while none so far flagged a class (fallback: a "
        "model one inverter flags costs that inverter's scan alone)",
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
    epochs: int = Field(
        default=20, ge=1, le=1000, description="Epochs of contrastive fine-tuning (the most, with early_stop)"
    )
    batch_size: int = Field(default=64, ge=2, le=4096, description="Clean images per batch")
    lr: float = Field(
        default=0.01,
        gt=0,
        le=10,
        description="SGD learning rate for the first 1/20 of epochs; then /10 until half, /100 after",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        le=100_000,
        json_schema_extra=ADDED_FIELD,
        description="Steps over which the learning rate rises linearly from lr/warmup_steps to the "
        "schedule's value at the start (0: none); the first steps meet the untouched backdoor, whose "
        "triggered images give the largest gradients",
    )
    max_grad_norm: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        json_schema_extra=ADDED_FIELD,
        description="Clip the gradient's global L2 norm to this before each step (None: no clipping)",
    )
    weight_decay: float = Field(default=1e-4, ge=0, le=0.1, description="SGD weight decay")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    temperature: float = Field(default=0.5, gt=0, le=100, description="Temperature τ of the contrastive loss")
    ce_weight: float = Field(
        default=1.0, ge=0, le=100, description="Weight λ of an added cross-entropy term (see ce_on)"
    )
    ce_on: Literal["clean", "clean+triggered"] = Field(
        default="clean+triggered",
        description="Inputs of the added cross-entropy term: clean ones, or clean and triggered ones (the "
        "triggered image keeps its true label, as in Neural Cleanse's unlearning)",
    )
    distill_weight: float = Field(
        default=0.0,
        json_schema_extra=ADDED_FIELD,
        ge=0,
        le=100,
        description="Weight of an added distillation term on clean images: KL from the frozen backdoored "
        "model's softened outputs to the trainable model's (0: off)",
    )
    distill_temperature: float = Field(
        default=2.0,
        gt=0,
        le=100,
        json_schema_extra=ADDED_FIELD,
        description="Temperature of the distillation term (scaled by its square)",
    )
    augment: bool = Field(default=True, description="Random crop (and flips where they fit) of each batch")
    stamp: Literal["after-augment", "before-augment"] = Field(
        default="before-augment",
        description="Stamp the recovered trigger on the augmented image (authors' code: the trigger stays "
        "where it was recovered), or before augmenting, so the pair is cropped and mirrored together and the "
        "trigger moves with the image as the attacker's poisoned training images did",
    )
    bn_mode: Literal["train", "eval"] = Field(
        default="train",
        description="Mode of the trainable model while purifying: train (BatchNorm statistics follow the "
        "batches, as in the authors' code) or eval (statistics frozen)",
    )

    early_stop: bool = Field(
        default=True,
        description="Stop before `epochs` once, on the defender's val split, every recovered trigger's "
        "success is at most early_stop_asr and clean accuracy has settled (see early_stop_patience)",
    )
    early_stop_asr: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Val success of a recovered trigger (on non-target images) that counts as removed",
    )
    early_stop_patience: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Val accuracy has settled when the last this-many epochs gained no more than "
        "early_stop_delta over the best accuracy before them",
    )
    early_stop_delta: float = Field(
        default=0.005, ge=0, le=1, description="Val accuracy gain (absolute) that still counts as moving"
    )
    recalibrate_bn: bool = Field(
        default=False,
        json_schema_extra=ADDED_FIELD,
        description="After purifying, re-estimate BatchNorm running statistics on the clean budget alone "
        "(purification batches mix triggered and clean images, and the statistics follow that mixture)",
    )
    refine_inverter: Choice | None = Field(
        default=None,
        json_schema_extra=ADDED_FIELD,
        description="An inverter run on the classes chosen for purification alone (never for detection): "
        "its trigger for each of them is unlearned beside the detecting inverter's, so a backdoor found by "
        "a small mask is also unlearned under a whole-image trigger (e.g. blend-inversion)",
    )
    refine_config: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra=ADDED_FIELD, description="Config values of refine_inverter"
    )
    select_epoch: Literal["last", "best-val"] = Field(
        default="last",
        json_schema_extra=ADDED_FIELD,
        description="Model returned: that of the last epoch run, or of the epoch with the best val accuracy "
        "among those whose every recovered trigger's val success is at most early_stop_asr (the last epoch "
        "when none is)",
    )

    @field_validator("inverter", mode="before")
    @classmethod
    def _inverter_list_not_empty(cls, value: Any) -> Any:
        """An empty list would scan nothing; one line says so instead of an error per union branch."""
        if isinstance(value, list) and not value:
            raise ValueError(
                'the list of inverters is empty; name at least one, e.g. "neural-cleanse:k-arm" or '
                '["neural-cleanse:k-arm","blend-inversion"]'
            )
        return value

    @model_validator(mode="after")
    def _inverter_config_fits(self) -> MCLDefConfig:
        """With several inverters, settings are addressed per inverter; a flat dict would be ambiguous."""
        if isinstance(self.inverter, list):
            if len(set(self.inverter)) != len(self.inverter):
                raise ValueError(f"inverter lists {self.inverter} with a repeat; name each inverter once")
            for key, values in self.inverter_config.items():
                if key not in self.inverter or not isinstance(values, dict):
                    raise ValueError(
                        f"with several inverters, inverter_config maps each of {self.inverter} to its "
                        f"settings (e.g. {{{self.inverter[-1]!r}: {{'steps': 200}}}}); got key {key!r}"
                    )
        return self

    @model_validator(mode="after")
    def _classes_are_mcldefs_to_choose(self) -> MCLDefConfig:
        """MCLDef tells its inverters which classes to scan (all, or `target`): an inverter's own
        `target` or `classes` would be overridden without a word, so setting one is an error."""
        if isinstance(self.inverter, list):
            settings = [v for v in self.inverter_config.values() if isinstance(v, dict)]
        else:
            settings = [self.inverter_config]
        for values in [*settings, self.refine_config]:
            for key in ("target", "classes"):
                if key in values:
                    raise ValueError(
                        f"an inverter's {key!r} is set in mcldef's inverter settings, but MCLDef chooses "
                        "the classes its inverters scan; give the known target as mcldef.target"
                    )
        return self

    @model_validator(mode="after")
    def _ce_on_needs_a_weight(self) -> MCLDefConfig:
        if self.ce_on != "clean" and self.ce_weight == 0:
            raise ValueError(f"ce_on={self.ce_on!r} has no effect with ce_weight=0; set ce_weight > 0")
        return self

    @model_validator(mode="after")
    def _early_stop_can_trigger(self) -> MCLDefConfig:
        # only when early stopping was asked for explicitly: lowering `epochs` alone just runs them all
        asked = {"early_stop", "early_stop_patience"} & self.model_fields_set
        if self.early_stop and asked and self.early_stop_patience >= self.epochs:
            raise ValueError(
                f"early_stop_patience={self.early_stop_patience} is not below epochs={self.epochs}, so early "
                "stopping can never trigger; lower the patience, raise epochs, or set early_stop=false"
            )
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
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(
            values={
                "stamp": "after-augment",
                "ce_weight": 0.0,
                "ce_on": "clean",
                "lr": 0.1,
                "epochs": 20,
                "batch_size": 64,
                "momentum": 0.9,
                "weight_decay": 1e-4,
                "temperature": 0.5,
                "augment": True,
                "bn_mode": "train",
                "inverter": "neural-cleanse",
                "inverter_config": {},
                "early_stop": False,
                "select_epoch": "last",
                "distill_weight": 0.0,
                "recalibrate_bn": False,
                "refine_inverter": None,
                "refine_config": {},
                "warmup_steps": 0,
                "max_grad_norm": None,
            },
            description="The authors' recipe (Yue et al. 2022): contrastive loss alone, lr 0.1 step "
            "schedule, 20 epochs, trigger stamped after augmentation, full Neural Cleanse scan",
        ),
        "global": Preset(
            values={"inverter": ["neural-cleanse:k-arm", "periodic-inversion"], "inverter_config": {}},
            description="The default with periodic-signal inversion beside Neural Cleanse's scan, their "
            "flags united: finds low-frequency whole-image triggers (SIG) without being told the target",
        ),
    }

    def __init__(self, config: StrictConfig, seed: int = 0, device: torch.device | None = None) -> None:
        """Resolves every configured inverter at once: an unknown name (answered with "did you
        mean" and the choices) or a bad setting of any of them fails here, when the runner checks the
        grid before training anything, never after another inverter of the list has scanned."""
        super().__init__(config, seed, device)
        c = self.config
        choices = [c.inverter] if isinstance(c.inverter, str) else c.inverter
        self.inverters: list[tuple[str, TriggerInverter]] = [
            (
                choice,
                create_inverter(
                    choice,
                    c.inverter_config if isinstance(c.inverter, str) else c.inverter_config.get(choice, {}),
                    seed=seed,
                    where=f"mcldef inverter {choice!r}",
                ),
            )
            for choice in choices
        ]
        self.refiner: TriggerInverter | None = (
            None
            if c.refine_inverter is None
            else create_inverter(
                c.refine_inverter,
                c.refine_config,
                seed=seed,
                where=f"mcldef refine_inverter {c.refine_inverter!r}",
            )
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
        diagnostics = inversion.summary()
        diagnostics.update({k: inversion.diagnostics[k] for k in MERGE_KEYS if k in inversion.diagnostics})

        chosen, detected, notes = self._choose_targets(inversion)
        diagnostics["chosen_targets"] = chosen
        if not chosen:
            return PurificationResult(
                model, modified=False, detected=detected, notes=notes, diagnostics=diagnostics,
                stage_seconds=stage_seconds, inversion=inversion,
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
                stage_seconds=stage_seconds, inversion=inversion,
            )  # fmt: skip

        if c.early_stop and len(data.val) == 0:
            raise ConfigError(
                "mcldef: early_stop reads the defender's val split, which is empty here (val_fraction 0); "
                "give the run a val split or set mcldef.early_stop=false."
            )
        if c.select_epoch == "best-val" and len(data.val) == 0:
            raise ConfigError(
                "mcldef: select_epoch='best-val' reads the defender's val split, which is empty here "
                "(val_fraction 0); give the run a val split or set mcldef.select_epoch=last."
            )
        triggers = [inversion.trigger(cls) for cls in usable]
        targets = list(usable)  # one per trigger: a refined class appears twice
        diagnostics["purified_targets"] = usable
        if self.refiner is not None:
            refine_start = time.perf_counter()
            refined, refined_triggers, refine_notes = self._refine(model, data, usable)
            stage_seconds["refinement"] = time.perf_counter() - refine_start
            targets += refined
            triggers += refined_triggers
            diagnostics["refined_targets"] = refined
            notes = f"{notes} {refine_notes}".strip()
        diagnostics["val_accuracy_before"] = accuracy(model, data.val, self.device)
        diagnostics["val_trigger_asr_before"] = self._trigger_asr(model, data.val, targets, triggers)
        start = time.perf_counter()
        watch = _ValWatch(self, model, data.val, targets, triggers)
        losses = self._contrastive_finetune(model, data, triggers, watch)
        stage_seconds["purification"] = time.perf_counter() - start
        diagnostics["epoch_losses"] = losses
        diagnostics["final_loss"] = losses[-1]
        diagnostics["epochs_run"] = len(losses)
        diagnostics["stopped_early"] = len(losses) < c.epochs
        if c.select_epoch == "best-val":  # 1-based, None: no epoch removed the triggers, the last is kept
            diagnostics["selected_epoch"] = None if watch.best_epoch is None else watch.best_epoch + 1
        diagnostics["val_accuracy_by_epoch"] = watch.accuracies
        diagnostics["val_trigger_asr_by_epoch"] = watch.trigger_asrs
        diagnostics["val_accuracy_after"] = accuracy(model, data.val, self.device)
        diagnostics["val_trigger_asr_after"] = self._trigger_asr(model, data.val, targets, triggers)
        notes += f" Purified against class(es) {usable} with {len(triggers)} recovered trigger(s)"
        notes += (
            f", stopped early after {len(losses)} of {c.epochs} epochs (val trigger success and accuracy "
            "settled)."
            if len(losses) < c.epochs
            else f", {len(losses)} epochs."
        )
        return PurificationResult(
            model, modified=True, detected=detected, notes=notes.strip(), diagnostics=diagnostics,
            stage_seconds=stage_seconds, inversion=inversion,
        )  # fmt: skip

    # --- stage 1 ---------------------------------------------------------------------------

    def _invert(self, model: ImageClassifier, data: DefenseData) -> InversionResult:
        """The inversion of the configured inverter, or of several combined (`inverters.combine`)."""
        c = self.config
        classes = None if c.target is None else [c.target]
        results: list[tuple[str, InversionResult]] = []
        for i, (choice, inverter) in enumerate(self.inverters):
            if c.inverter_mode == "fallback" and any(result.flagged for _, result in results):
                break
            try:
                results.append((choice, inverter.invert(model, data, classes)))
            except Exception as exc:  # any failure: the scan is incomplete, so nothing is purified
                raise self._failed(choice, i, exc) from exc
        if isinstance(c.inverter, str):
            return results[0][1]
        combined = combine(results, known=c.target)
        ran = {name for name, _ in results}
        combined.diagnostics[INVERTERS_SKIPPED] = [name for name, _ in self.inverters if name not in ran]
        return combined

    def _refine(
        self, model: ImageClassifier, data: DefenseData, classes: list[int]
    ) -> tuple[list[int], list[MaskTrigger], str]:
        """`refine_inverter`'s triggers for `classes` (those that fire at least `min_attack_success`
        on val), and notes saying which were kept. Its flags are ignored: detection is `inverter`'s."""
        c = self.config
        assert self.refiner is not None and c.refine_inverter is not None
        try:
            result = self.refiner.invert(model, data, list(classes))
        except Exception as exc:  # the cell fails naming it, as a failed detecting inverter does
            raise InverterFailedError(
                f"mcldef: refine_inverter {c.refine_inverter!r} failed: {_error_detail(exc)}"
            ) from exc
        kept = [
            cls
            for cls in classes
            if float(result.attack_success[result.classes.index(cls)]) >= c.min_attack_success
        ]
        dropped = [cls for cls in classes if cls not in kept]
        notes = f"Also unlearned the trigger of {c.refine_inverter!r} for class(es) {kept}."
        if dropped:
            notes += f" Its trigger for {dropped} fires below min_attack_success, not used."
        return kept, [result.trigger(cls) for cls in kept], notes

    def _failed(self, choice: str, i: int, exc: Exception) -> InverterFailedError:
        """The error of inverter `choice` (the `i`-th), naming it; with a list, also that the other
        inverters' results are not used on their own."""
        detail = _error_detail(exc)
        message = f"mcldef: inverter {choice!r} failed: {detail}"
        if len(self.inverters) > 1:
            message = (
                f"mcldef: inverter {choice!r} ({i + 1} of {len(self.inverters)}) failed: {detail}. The "
                "scan is incomplete, so the other inverters' results are not used on their own; fix "
                "it or remove it from mcldef.inverter."
            )
        return InverterFailedError(message)

    def _inverter_label(self) -> str:
        """The configured inverter(s) as notes name them."""
        inverter = self.config.inverter
        return repr(inverter) if isinstance(inverter, str) else " + ".join(map(repr, inverter))

    def _choose_targets(self, inversion: InversionResult) -> tuple[list[int], bool | None, str]:
        """The classes to purify against, whether a backdoor was detected, and notes saying why."""
        c = self.config
        if c.target is not None:
            return [c.target], None, f"Known target {c.target} given; no detection run."
        if inversion.flagged:
            notes = f"Inverter {self._inverter_label()} flagged {inversion.flagged}."
            if FLAGGED_BY in inversion.diagnostics:
                who = inversion.diagnostics[FLAGGED_BY].items()
                source = inversion.diagnostics[TRIGGER_FROM]
                detail = "; ".join(f"{cls} by {', '.join(by)} (trigger of {source[cls]})" for cls, by in who)
                notes += f" Flagged: {detail}."
            return list(inversion.flagged), True, notes
        top = inversion.ranked()[0]
        i = inversion.classes.index(top)
        summary = (
            f"No class flagged by {self._inverter_label()} (top-ranked class {top}, anomaly index "
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
        self, model: ImageClassifier, data: DefenseData, triggers: list[MaskTrigger], watch: _ValWatch
    ) -> list[float]:
        """Fine-tune `model` in place; each image is stamped with one of `triggers` drawn at random.

        After every epoch `watch` reads the val split; with `early_stop` the loop ends as soon as
        it says the trigger is gone and clean accuracy has settled.
        """
        c = self.config
        gen = torch.Generator().manual_seed(self.seed)
        epoch_losses = []
        # the caller gets the model back in the layout it handed in
        with preferred_layout(model.to(self.device), self.device):
            step = self.step_runner(model, triggers, data.spec.hflip)
            steps_taken = 0
            for epoch in range(c.epochs):
                lr = step_lr(epoch, c.epochs, c.lr)
                seen, total = 0, 0.0
                for x, y in iterate_batches(data.train.images, data.train.labels, c.batch_size, gen):
                    steps_taken += 1
                    step.set_lr(lr * min(1.0, steps_taken / c.warmup_steps) if c.warmup_steps else lr)
                    total += step(x, y, gen) * y.numel()
                    seen += y.numel()
                epoch_losses.append(total / max(seen, 1))
                if not math.isfinite(epoch_losses[-1]):
                    raise BdtkError(
                        f"mcldef: the purification loss became {epoch_losses[-1]} in epoch {epoch + 1}; "
                        "lower mcldef.lr."
                    )
                if watch.settled(stop=c.early_stop):
                    break
                model.train(c.bn_mode == "train")
            if c.select_epoch == "best-val" and watch.best_state is not None:
                model.load_state_dict(watch.best_state)
            if c.recalibrate_bn:
                recalibrate_batchnorm(model, data.train.images, c.batch_size, self.device)
        model.eval()
        return epoch_losses

    def step_runner(self, model: ImageClassifier, triggers: list[MaskTrigger], hflip: bool) -> _Step:
        """One purification step of `model` (trained in place) against `triggers`, as a callable.

        The trainable model and its frozen copy run in the device's fastest memory layout
        (`preferred_memory_format`); the model stays in it (`_contrastive_finetune` restores the
        caller's layout around the whole run).
        """
        c, device = self.config, self.device
        layout = preferred_memory_format(device)
        model.to(device).to(memory_format=layout).train(c.bn_mode == "train")
        frozen = FrozenReference(copy.deepcopy(model)).to(device)
        masks = torch.stack([t.mask for t in triggers]).to(device)
        patterns = torch.stack([t.pattern for t in triggers]).to(device)
        optimiser = torch.optim.SGD(
            model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
        )

        def step(x: Tensor, y: Tensor, gen: torch.Generator) -> float:
            clean, triggered = self._pairs(x.to(device), masks, patterns, hflip, gen)
            clean = clean.contiguous(memory_format=layout)
            triggered = triggered.contiguous(memory_format=layout)
            loss = self._loss(model, frozen, clean, triggered, y.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if c.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
            optimiser.step()
            return float(loss.detach())

        return _Step(step, optimiser)

    def _pairs(
        self, x: Tensor, masks: Tensor, patterns: Tensor, hflip: bool, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Clean and triggered views of a batch; each image gets one of the triggers at random."""
        c = self.config
        if c.augment and c.stamp == "after-augment":
            x = augment_batch(x, hflip, gen)
        which = torch.randint(masks.shape[0], (x.shape[0],), generator=gen).to(x.device)
        triggered = stamp(x, masks[which], patterns[which]).clamp(0, 1)
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
        if c.ce_weight == 0 and c.distill_weight == 0:
            return model_contrastive_loss(model.features(triggered), positive, negative, c.temperature)
        features = model.features(torch.cat([triggered, clean]))
        contrastive = model_contrastive_loss(features[: clean.shape[0]], positive, negative, c.temperature)
        loss = contrastive
        if c.ce_weight:
            if c.ce_on == "clean":
                ce_features, targets = features[clean.shape[0] :], labels
            else:  # the triggered images keep their true labels
                ce_features, targets = features, torch.cat([labels, labels])
            loss = loss + c.ce_weight * F.cross_entropy(model.fc(ce_features), targets)
        if c.distill_weight:
            # the backdoored model is right on clean images: keep its whole output there, not only
            # the budget's hard labels, so that a few hundred images do not pull the rest of the
            # decision boundaries along
            t = c.distill_temperature
            student = F.log_softmax(model.fc(features[clean.shape[0] :]) / t, dim=1)
            teacher = F.log_softmax(frozen.model.fc(positive) / t, dim=1)
            kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
            loss = loss + c.distill_weight * t * t * kl
        return loss

    def _trigger_asr(
        self, model: ImageClassifier, val: ImageData, targets: list[int], triggers: list[MaskTrigger]
    ) -> dict[str, float]:
        """Share of non-target validation images each recovered trigger sends to its class."""
        out = {}
        for j, (cls, trigger) in enumerate(zip(targets, triggers, strict=True)):
            victims = val.labels != cls
            if not bool(victims.any()):
                continue
            pred = predict(model, val.images[victims], self.device, transform=trigger)
            key = str(cls) if str(cls) not in out else f"{cls} (trigger {j + 1})"  # a refined class's second
            out[key] = float((pred == cls).float().mean())
        return out


class _Step:
    """A purification step bound to its model, frozen copy, triggers and optimiser."""

    def __init__(self, run: Callable[[Tensor, Tensor, torch.Generator], float], optimiser: Optimizer) -> None:
        self._run, self.optimiser = run, optimiser

    def __call__(self, x: Tensor, y: Tensor, gen: torch.Generator) -> float:
        """Train on one batch of clean images `x` with labels `y`; returns the batch's loss."""
        return self._run(x, y, gen)

    def set_lr(self, lr: float) -> None:
        for group in self.optimiser.param_groups:
            group["lr"] = lr


class _ValWatch:
    """Reads the val split after each epoch: clean accuracy and each recovered trigger's success.

    The rule (documented in docs/defenses/mcldef.md): stop once every trigger's val success is at
    most `early_stop_asr` *and* the best val accuracy of the last `early_stop_patience` epochs is no
    more than `early_stop_delta` above the best before them. Only the defender's val split is read,
    never test data.
    """

    def __init__(
        self,
        purifier: MCLDef,
        model: ImageClassifier,
        val: ImageData,
        targets: list[int],
        triggers: list[MaskTrigger],
    ) -> None:
        self.purifier, self.model, self.val = purifier, model, val
        self.targets, self.triggers = targets, triggers
        self.accuracies: list[float] = []
        self.trigger_asrs: list[float] = []
        # with select_epoch="best-val": the weights of the best epoch whose triggers are removed
        self.best_epoch: int | None = None
        self.best_state: dict[str, Tensor] | None = None

    def settled(self, stop: bool) -> bool:
        """Record this epoch's val numbers; True when `stop` and the rule says training is done."""
        c = self.purifier.config
        if not stop and not len(self.val):
            return False
        device = self.purifier.device
        self.accuracies.append(round(accuracy(self.model, self.val, device), 6))
        rates = self.purifier._trigger_asr(self.model, self.val, self.targets, self.triggers)
        self.trigger_asrs.append(round(max(rates.values(), default=0.0), 6))
        removed = self.trigger_asrs[-1] <= c.early_stop_asr
        better = self.best_epoch is None or self.accuracies[-1] > self.accuracies[self.best_epoch]
        if c.select_epoch == "best-val" and removed and better:
            self.best_epoch = len(self.accuracies) - 1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        k = c.early_stop_patience
        if not stop or len(self.accuracies) <= k or not removed:
            return False
        return max(self.accuracies[-k:]) <= max(self.accuracies[:-k]) + c.early_stop_delta
