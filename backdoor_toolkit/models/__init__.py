"""The model zoo and the interface defenses use to reach inside a model."""

from .base import Capability, ImageClassifier, Normalize, check_capabilities
from .registry import ModelEntry, available_models, create_model, register_model

__all__ = [
    "Capability",
    "ImageClassifier",
    "ModelEntry",
    "Normalize",
    "available_models",
    "check_capabilities",
    "create_model",
    "register_model",
]
