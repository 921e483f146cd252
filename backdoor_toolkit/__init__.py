"""bdtk: attack, inspect and purify backdoored PyTorch image classifiers.

This module is the public API that plugins (built-in and third-party alike) import from, and the
entry points for purifying or inspecting your own model from Python: `purify`, `inspect`,
`load_model`, `load_image_folder` (docs/purify.md).
"""

from .config import ADDED_FIELD, StrictConfig, build_config
from .data import DataSpec, DefenseData, ImageData, to_float
from .errors import BdtkError, ConfigError, ModelRequirementError, NonFiniteError
from .finetuning import FineTuneConfig, fine_tune
from .hookspecs import Register, hookimpl
from .image_folders import FolderImages, load_image_folder
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
from .models import (
    AdaptedClassifier,
    Capability,
    ImageClassifier,
    LoadedModel,
    adapt,
    create_model,
    load_model,
    save_model,
)
from .plugins import (
    create_attack,
    create_inverter,
    create_purifier,
    get_attack,
    get_inverter,
    get_purifier,
    reset_plugin_manager,
    resolve_config,
)
from .purification import InspectReport, PurifyReport, inspect, purify
from .training import (
    BatchHook,
    LossFn,
    TrainingSettings,
    augment_batch,
    check_finite,
    cross_entropy_loss,
    iterate_batches,
    preferred_layout,
    preferred_memory_format,
    seed_everything,
    train_classifier,
)
from .triggers import MaskTrigger, Trigger

__all__ = [
    "ADDED_FIELD",
    "MAD_CONSISTENCY",
    "AdaptedClassifier",
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
    "FolderImages",
    "ImageClassifier",
    "ImageData",
    "InspectReport",
    "InversionKeys",
    "InversionResult",
    "LoadedModel",
    "LossFn",
    "MaskTrigger",
    "ModelRequirementError",
    "NonFiniteError",
    "PluginMeta",
    "PoisonedTrainingSet",
    "Preset",
    "PurificationResult",
    "Purifier",
    "PurifyReport",
    "Register",
    "StrictConfig",
    "TrainingSettings",
    "Trigger",
    "TriggerInverter",
    "accuracy",
    "adapt",
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
    "inspect",
    "iterate_batches",
    "load_image_folder",
    "load_model",
    "predict",
    "preferred_layout",
    "preferred_memory_format",
    "purify",
    "reset_plugin_manager",
    "resolve_config",
    "save_model",
    "seed_everything",
    "split_diagnostics",
    "stamp",
    "stamp_all",
    "to_float",
    "train_classifier",
]
