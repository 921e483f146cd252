"""The three plugin interfaces (Attack, TriggerInverter, Purifier) and their result types.

Every plugin class carries `name`, a nested pydantic `Config` (extra fields forbidden, every field
described and bounded), `meta` (paper, year, threat model, what it needs from the model) and
optionally `presets` (named config values). Instances are created per run from a validated config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from .config import StrictConfig
from .data import DataSpec, DefenseData, ImageData
from .inversion import InversionKeys
from .models import Capability, ImageClassifier
from .training import BatchHook, TrainingSettings, augment_batch, train_classifier
from .triggers import MaskTrigger

Kind = Literal["attack", "inverter", "purifier"]


UNDEFENDED = "none"
"""The `defense` of a reference row: the backdoored model as the attack left it."""
CLEAN_MODEL = "clean-model"
"""The `defense` of a reference row: a never-backdoored model of the same setting and seed, shown
the attack's trigger. Its ASR is the floor: what the trigger does to a model with no backdoor."""
REFERENCE_ROWS = (UNDEFENDED, CLEAN_MODEL)
"""Rows that are not defenses: never ranked, and no purifier may take their names."""


class PluginMeta(BaseModel):
    """What a plugin is and what it needs; shown by `bdtk plugins show`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: str = Field(description="One line on what the method does")
    paper: str = Field(default="", description="Citation of the method's paper")
    year: int | None = Field(default=None, description="Year of publication")
    url: str = Field(default="", description="Link to the paper")
    threat_model: str = Field(default="", description="What the attacker or defender controls")
    requires: tuple[Capability, ...] = Field(default=(), description="What the plugin needs from the model")


class Preset(BaseModel):
    """A named set of config values of one plugin, selected as `NAME:PRESET` (e.g. `mcldef:paper`).

    A preset pins a recipe (a paper's published settings, a fast variant) by name, so that it
    stays the same when the plugin's defaults change and gets its own leaderboard row. Its values
    lie between the defaults and explicit values: defaults ⊕ preset ⊕ `--set`/config values. The
    registry checks at registration that they validate against the plugin's `Config`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    values: dict[str, Any] = Field(description="Config values, each a field of the plugin's Config")
    description: str = Field(min_length=1, description="One line: what the preset is, where it comes from")


class Plugin(ABC):
    """Common shape of every registered plugin class."""

    kind: ClassVar[Kind]
    name: ClassVar[str]
    Config: ClassVar[type[StrictConfig]] = StrictConfig
    meta: ClassVar[PluginMeta]
    #: Named presets, selected as `NAME:PRESET`; checked against `Config` at registration.
    presets: ClassVar[dict[str, Preset]] = {}

    def __init__(self, config: StrictConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed


# --- attacks ---------------------------------------------------------------------------------


class AttackConfig(StrictConfig):
    """Settings every attack shares; plugins subclass it to add their trigger parameters."""

    target: int = Field(default=0, ge=0, description="Target class (all-to-one)")
    mode: Literal["all-to-one", "all-to-all"] = Field(
        default="all-to-one", description="all-to-one → target; all-to-all → (y + 1) mod K"
    )
    poison_rate: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Share of the training set that is poisoned"
    )


@dataclass
class PoisonedTrainingSet:
    """The attacker's training set: float images in [0, 1], labels, and which indices changed."""

    images: Tensor
    labels: Tensor
    poisoned_index: Tensor


class Attack(Plugin):
    """A backdoor attack.

    Plain data poisoning overrides `apply_trigger` only. An attack that controls the training
    loop also overrides `training_batch` (called on every batch, e.g. WaNet), or `fit` as a whole
    (e.g. input-aware attacks that co-train a generator). `apply_trigger` is the test-time
    trigger used to measure ASR; state it needs (a generated pattern, a warp field, a generator)
    is saved with the backdoored model through `trigger_state` / `load_trigger_state`.
    `training_batch` sees raw batches, which the training loop then augments, unless
    `poisons_augmented_batches()` is true: then the default `fit` augments first and poisons the
    augmented batch, so a trigger that augmentation would distort stays exact.
    """

    kind: ClassVar[Kind] = "attack"
    Config: ClassVar[type[StrictConfig]] = AttackConfig
    #: True for attacks that keep labels of poisoned samples (clean-label).
    clean_label: ClassVar[bool] = False
    #: True for training-controlled attacks that poison augmented batches; an attack whose order
    #: is a config choice overrides `poisons_augmented_batches` instead.
    poison_after_augment: ClassVar[bool] = False
    config: AttackConfig

    def __init__(self, config: AttackConfig, spec: DataSpec, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.spec = spec
        if config.target >= spec.num_classes:
            from .errors import ConfigError

            raise ConfigError(
                f"Attack {self.name!r}: target {config.target} is outside the "
                f"{spec.num_classes} classes of {spec.name!r} (0–{spec.num_classes - 1})."
            )
        self.validate_for(spec)

    def validate_for(self, spec: DataSpec) -> None:
        """Check trigger parameters against the dataset before any training; raise ConfigError."""

    @abstractmethod
    def apply_trigger(self, images: Tensor) -> Tensor:
        """Stamp the trigger on a float batch in [0, 1]; returns a new tensor."""

    def target_labels(self, labels: Tensor) -> Tensor:
        """The labels the backdoor maps triggered inputs of true class `labels` to."""
        if self.config.mode == "all-to-all":
            return (labels + 1) % self.spec.num_classes
        return torch.full_like(labels, self.config.target)

    def non_target_mask(self, labels: Tensor) -> Tensor:
        """Which images the backdoor can act on (and ASR/RA count): target differs from class."""
        return self.target_labels(labels) != labels

    def victim_mask(self, labels: Tensor) -> Tensor:
        """Deprecated name of `non_target_mask` ("victim" means the backdoored model)."""
        return self.non_target_mask(labels)

    def prepare(self, context: AttackContext) -> None:
        """Build trigger state before poisoning (e.g. optimise a Trojan patch); default: nothing."""

    def poison_candidates(self, labels: Tensor) -> Tensor:
        """Indices that may be poisoned: non-target samples (target-class ones for clean-label)."""
        return torch.nonzero(self.non_target_mask(labels)).squeeze(1)

    def choose_poisoned(self, labels: Tensor) -> Tensor:
        """Draw `poison_rate × N` indices once with the seed."""
        from .errors import ConfigError

        candidates = self.poison_candidates(labels)
        count = round(self.config.poison_rate * labels.numel())
        if count > candidates.numel():
            raise ConfigError(
                f"Attack {self.name!r}: poison_rate={self.config.poison_rate} needs {count} "
                f"images but only {candidates.numel()} are eligible."
            )
        gen = torch.Generator().manual_seed(self.seed)
        return candidates[torch.randperm(candidates.numel(), generator=gen)[:count]].sort().values

    def poison_training_set(self, train: ImageData) -> PoisonedTrainingSet:
        """Stamp and relabel the chosen indices (labels stay for clean-label attacks)."""
        images = train.float_images()
        labels = train.labels.clone()
        index = self.choose_poisoned(labels)
        for chunk in index.split(1024):
            images[chunk] = self.apply_trigger(images[chunk]).clamp(0, 1)
            if not self.clean_label:
                labels[chunk] = self.target_labels(labels[chunk])
        return PoisonedTrainingSet(images, labels, index)

    def training_batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Called on every training batch; training-controlled attacks poison here."""
        return images, labels

    def poisons_augmented_batches(self) -> bool:
        """Whether `training_batch` sees augmented batches (True) or raw ones that are augmented
        after it (False, the default)."""
        return self.poison_after_augment

    def fit(self, model: ImageClassifier, data: PoisonedTrainingSet, settings: TrainingSettings) -> None:
        """Train `model` on the poisoned set; override to control the whole loop."""
        hook: BatchHook = self.training_batch
        if self.poisons_augmented_batches() and settings.augment:
            gen = torch.Generator().manual_seed(self.seed + 1)
            hflip = settings.hflip

            def augmented(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
                return self.training_batch(augment_batch(x, hflip, gen), y)

            hook, settings = augmented, replace(settings, augment=False)
        train_classifier(model, data.images, data.labels, settings, seed=self.seed, batch_hook=hook)

    def trigger_state(self) -> dict[str, Tensor]:
        """Tensors the test-time trigger depends on, saved beside a cached model."""
        return {}

    def load_trigger_state(self, state: dict[str, Tensor]) -> None:
        """Restore what `trigger_state` returned."""


@dataclass
class AttackContext:
    """What an attack may use while preparing: the clean data and a way to train a clean model."""

    spec: DataSpec
    train: ImageData
    model_name: str
    settings: TrainingSettings
    clean_model: Callable[[], ImageClassifier]


# --- trigger inversion -----------------------------------------------------------------------


@dataclass
class InversionResult:
    """Per-class recovered triggers, their anomaly scores and the flagged target classes.

    `diagnostics` holds what the inverter wants to explain (JSON-serialisable); keys with a shared
    meaning (per-class λ and steps, the scan's cost) are spelled as in `InversionKeys`, and a list
    with one plain value per class is shown as a column by `bdtk inspect`.
    """

    classes: list[int]
    masks: Tensor  # (K, 1, H, W) in [0, 1]
    patterns: Tensor  # (K, C, H, W) in [0, 1]
    mask_norms: Tensor  # (K,) L1 norms
    attack_success: Tensor  # (K,) share of clean non-class images the trigger sends to the class
    anomaly_index: Tensor  # (K,) |s − median(s)| / (1.4826 · MAD(s)); s = norms or log norms
    flagged: list[int]
    seconds: float = 0.0
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def trigger(self, cls: int) -> MaskTrigger:
        i = self.classes.index(cls)
        return MaskTrigger(self.masks[i], self.patterns[i])

    def ranked(self) -> list[int]:
        """Classes from the most to the least suspicious (smallest mask norm first)."""
        order = torch.argsort(self.mask_norms)
        return [self.classes[int(i)] for i in order]

    def summary(self) -> dict[str, Any]:
        """The inversion as a purifier records it in its diagnostics, under `InversionKeys`.

        Per-class numbers rounded to 4 decimals (a stored row explains a result, it does not
        reproduce it) and the inverter's scan-cost keys, where it wrote them. Every purifier that
        runs an inverter records it this way, so rows of different defenses read alike.
        """
        k = InversionKeys
        return {
            k.CLASSES: list(self.classes),
            k.FLAGGED: list(self.flagged),
            k.ANOMALY_INDEX: [round(float(v), 4) for v in self.anomaly_index],
            k.MASK_NORMS: [round(float(v), 4) for v in self.mask_norms],
            k.ATTACK_SUCCESS: [round(float(v), 4) for v in self.attack_success],
            k.SECONDS: self.seconds,
            **{key: self.diagnostics[key] for key in k.SCAN if key in self.diagnostics},
        }


class TriggerInverter(Plugin):
    """Recovers candidate triggers from a model and a clean budget, and flags target classes.

    It has no device of its own: it runs where the model is (`next(model.parameters()).device`;
    a purifier moves the model to its `self.device` first), reads `data.train` (and `data.val` for
    its success rates), and returns tensors of any device (`InversionResult`'s fields say their
    shapes). `stamp`, `flag_targets` and `anomaly_index` are the shared pieces to build on.
    """

    kind: ClassVar[Kind] = "inverter"

    @abstractmethod
    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        """Invert `classes` (all by default); must not change `model`'s weights."""


# --- purification ----------------------------------------------------------------------------


@dataclass
class PurificationResult:
    """The purified model and why it looks the way it does.

    `modified` is False when the defense deliberately returned the model unchanged (e.g. no
    backdoor detected); `notes` says so in words; `diagnostics` holds what explains a leaderboard
    row (pruned channels, chosen threshold, teacher accuracy, …) and must be JSON-serialisable.
    A defense that ran a trigger inverter returns its result as `inversion` (besides recording
    `inversion.summary()` in `diagnostics`): the diagnostics keep numbers, not the triggers, and
    `bdtk purify` needs the triggers to measure each one's success before and after and to draw it.
    """

    model: nn.Module
    modified: bool = True
    detected: bool | None = None
    notes: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    inversion: InversionResult | None = None


class Purifier(Plugin):
    """Removes a backdoor using only the defender's clean budget (train and validation parts)."""

    kind: ClassVar[Kind] = "purifier"

    def __init__(self, config: StrictConfig, seed: int = 0, device: torch.device | None = None) -> None:
        super().__init__(config, seed)
        self.device = device or torch.device("cpu")

    @abstractmethod
    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        """Return a purified model; `model` may be modified in place or copied."""
