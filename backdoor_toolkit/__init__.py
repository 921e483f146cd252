"""bdtk: attack, inspect and purify backdoored PyTorch image classifiers.

This module is the public API that plugins (built-in and third-party alike) import from.
"""

from .config import StrictConfig, build_config
from .data import DataSpec, DefenseData, ImageData, to_float
from .errors import BdtkError, ConfigError, ModelRequirementError
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
from .metrics import accuracy, attack_scores, predict
from .models import Capability, ImageClassifier, create_model
from .plugins import create_inverter, get_attack, get_inverter, get_purifier, resolve_config
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
    "Attack",
    "AttackConfig",
    "AttackContext",
    "BatchHook",
    "BdtkError",
    "Capability",
    "ConfigError",
    "DataSpec",
    "DefenseData",
    "ImageClassifier",
    "ImageData",
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
    "attack_scores",
    "augment_batch",
    "build_config",
    "check_finite",
    "create_inverter",
    "create_model",
    "cross_entropy_loss",
    "get_attack",
    "get_inverter",
    "get_purifier",
    "hookimpl",
    "iterate_batches",
    "predict",
    "preferred_memory_format",
    "resolve_config",
    "seed_everything",
    "to_float",
    "train_classifier",
]
