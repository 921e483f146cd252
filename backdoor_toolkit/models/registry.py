"""The model zoo: names → constructors, listed with a one-line description (timm-style)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..data import DataSpec
from ..errors import UnknownNameError
from .base import ImageClassifier
from .preact_resnet import BackdoorBenchPreActResNet18
from .resnet import ResNet18
from .small_cnn import SmallCNN
from .vgg import VGG11BN
from .wide_resnet import WideResNet

Factory = Callable[[DataSpec], ImageClassifier]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    factory: Factory


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, description: str) -> Callable[[Factory], Factory]:
    """Add a constructor to the zoo under `name`."""

    def deco(fn: Factory) -> Factory:
        _MODELS[name] = ModelEntry(name, description, fn)
        return fn

    return deco


def available_models() -> list[ModelEntry]:
    return [_MODELS[k] for k in sorted(_MODELS)]


def create_model(name: str, spec: DataSpec) -> ImageClassifier:
    """Build model `name` for a dataset's channels, classes and normalisation."""
    if name not in _MODELS:
        raise UnknownNameError("model", name, sorted(_MODELS))
    return _MODELS[name].factory(spec)


@register_model("wrn-16-1", "WideResNet-16-1 (0.17M params); the MCLDef authors' model")
def _wrn_16_1(s: DataSpec) -> ImageClassifier:
    return WideResNet(16, 1, s.channels, s.num_classes, s.mean, s.std)


@register_model("wrn-16-2", "WideResNet-16-2 (0.69M params)")
def _wrn_16_2(s: DataSpec) -> ImageClassifier:
    return WideResNet(16, 2, s.channels, s.num_classes, s.mean, s.std)


@register_model("preact-resnet18", "PreAct-ResNet-18 (He et al. 2016), CIFAR stem, BN-ReLU before pooling")
def _preact18(s: DataSpec) -> ImageClassifier:
    return ResNet18(s.channels, s.num_classes, s.mean, s.std, preact=True)


@register_model("preact-resnet18-bb", "BackdoorBench's PreAct-ResNet-18: no BN-ReLU before pooling")
def _preact18_bb(s: DataSpec) -> ImageClassifier:
    return BackdoorBenchPreActResNet18(s.channels, s.num_classes, s.mean, s.std)


@register_model("resnet18", "ResNet-18, CIFAR stem (3×3 conv, no max-pool)")
def _resnet18(s: DataSpec) -> ImageClassifier:
    return ResNet18(s.channels, s.num_classes, s.mean, s.std, preact=False)


@register_model("vgg11-bn", "VGG-11 with BatchNorm, one linear head")
def _vgg11(s: DataSpec) -> ImageClassifier:
    return VGG11BN(s.channels, s.num_classes, s.mean, s.std)


@register_model("small-cnn", "Three-stage CNN (0.1M params) for tests and quick trials")
def _small_cnn(s: DataSpec) -> ImageClassifier:
    return SmallCNN(s.channels, s.num_classes, s.mean, s.std)
