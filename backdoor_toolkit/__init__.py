"""bdtk: attack, inspect and purify backdoored PyTorch image classifiers.

This module is the public API that plugins (built-in and third-party alike) import from.
"""

from .config import StrictConfig, build_config
from .data import DataSpec, DefenseData, ImageData, to_float
from .errors import BdtkError, ConfigError, ModelRequirementError
from .finetuning import FineTuneConfig, fine_tune
from .hookspecs import hookimpl
from .interfaces import (
    Attack,
    AttackConfig,
    AttackContext,
    InversionResult,
    PluginMeta,
    PoisonedTrainingSet,
    Preset,
    PurificationResult,
    Purifier,
    TriggerInverter,
)
from .inversion import (
    MAD_CONSISTENCY,
    InversionKeys,
    anomaly_index,
    flag_targets,
    split_diagnostics,
    stamp,
    stamp_all,
)
from .metrics import accuracy, attack_scores, predict
from .models import Capability, ImageClassifier, create_model
from .plugins import (
    create_attack,
    create_inverter,
    create_purifier,
    get_attack,
    get_inverter,
    get_purifier,
    resolve_config,
)
from .training import (
    BatchHook,
    LossFn,
    TrainingSettings,
    augment_batch,
    check_finite,
    cross_entropy_loss,
    iterate_batches,
    preferred_memory_format,
    seed_everything,
    train_classifier,
)
from .triggers import MaskTrigger, Trigger

__all__ = [
    "MAD_CONSISTENCY",
    "Attack",
    "AttackConfig",
    "AttackContext",
    "BatchHook",
    "BdtkError",
    "Capability",
    "ConfigError",
    "DataSpec",
    "DefenseData",
    "FineTuneConfig",
    "ImageClassifier",
    "ImageData",
    "InversionKeys",
    "InversionResult",
    "LossFn",
    "MaskTrigger",
    "ModelRequirementError",
    "PluginMeta",
    "PoisonedTrainingSet",
    "Preset",
    "PurificationResult",
    "Purifier",
    "StrictConfig",
    "TrainingSettings",
    "Trigger",
    "TriggerInverter",
    "accuracy",
    "anomaly_index",
    "attack_scores",
    "augment_batch",
    "build_config",
    "check_finite",
    "create_attack",
    "create_inverter",
    "create_model",
    "create_purifier",
    "cross_entropy_loss",
    "fine_tune",
    "flag_targets",
    "get_attack",
    "get_inverter",
    "get_purifier",
    "hookimpl",
    "iterate_batches",
    "predict",
    "preferred_memory_format",
    "resolve_config",
    "seed_everything",
    "split_diagnostics",
    "stamp",
    "stamp_all",
    "to_float",
    "train_classifier",
]
