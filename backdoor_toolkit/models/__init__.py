"""The model zoo, the interface defenses use to reach inside a model, the adapter for any other
PyTorch classifier and the reading and writing of model files."""

from .adapter import AdaptedClassifier, adapt
from .base import Capability, ImageClassifier, Normalize, check_capabilities
from .loading import LoadedModel, load_model, save_model
from .registry import ModelEntry, available_models, create_model, register_model

__all__ = [
    "AdaptedClassifier",
    "Capability",
    "ImageClassifier",
    "LoadedModel",
    "ModelEntry",
    "Normalize",
    "adapt",
    "available_models",
    "check_capabilities",
    "create_model",
    "load_model",
    "register_model",
    "save_model",
]
