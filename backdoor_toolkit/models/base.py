"""The one interface every bdtk model offers to attacks and defenses.

A model is  normalize → stem → groups → final → pool → fc.  Defenses reach inside only through
these names:
- `features(x)`: the penultimate representation (after the last activation and global pooling);
  MCLDef contrasts it.
- `layer_groups()`: the stages whose outputs NAD distils attention from.
- `final_maps(x)` / `final`: the last convolutional feature maps (B, C, H, W) after activation;
  fine-pruning masks their channels with a forward hook on `final`.
- `batchnorms()`: the BatchNorm layers that ANP perturbs and masks.
Inputs are float images in [0, 1]; normalisation is the first layer, so triggers live in pixel
space.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor, nn

from ..errors import ModelRequirementError


class Capability(str, Enum):
    """What a plugin may require of a model; checked before a run.

    - FEATURES: `model.features(x)` gives the penultimate features and `model.fc` is the linear
      head that maps them to logits (every zoo model; a loaded network with an nn.Linear).
    - LAYER_GROUPS: `model.layer_groups()` lists the network's stages in order (zoo models).
    - FINAL_MAPS: `model.final_maps(x)` gives the last convolutional feature maps (zoo models).
    - BATCHNORM: `model.batchnorms()` lists at least one nn.BatchNorm2d.
    """

    FEATURES = "features"
    LAYER_GROUPS = "layer_groups"
    FINAL_MAPS = "final_maps"
    BATCHNORM = "batchnorm"


class Normalize(nn.Module):
    """Per-channel standardisation as the model's first layer."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Base class of the zoo; subclasses fill `stem`, `groups`, `final` and `fc`."""

    stem: nn.Module
    groups: nn.ModuleList
    final: nn.Module
    fc: nn.Linear

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_classes: int) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.num_classes = num_classes

    def final_maps(self, x: Tensor) -> Tensor:
        h = self.stem(self.normalize(x))
        for group in self.groups:
            h = group(h)
        return self.final(h)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.final_maps(x), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def layer_groups(self) -> list[nn.Module]:
        return list(self.groups)

    def batchnorms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def capabilities(self) -> set[Capability]:
        caps = {Capability.FEATURES, Capability.FINAL_MAPS}
        if len(self.groups) >= 1:
            caps.add(Capability.LAYER_GROUPS)
        if self.batchnorms():
            caps.add(Capability.BATCHNORM)
        return caps

    def capability_notes(self) -> dict[Capability, str]:
        """Why each missing capability is missing, in words; `check_capabilities` appends it.

        Empty for zoo models, whose missing capabilities need no explanation. A model bdtk did not
        build (the adapter) says what it could not derive, so the refusal tells the user what to do.
        """
        return {}


def check_capabilities(model: nn.Module, required: Sequence[Capability], who: str) -> None:
    """Fail with a clear message when `model` lacks what plugin `who` needs."""
    if not required:
        return
    if not isinstance(model, ImageClassifier):
        raise ModelRequirementError(
            f"{who} needs a bdtk ImageClassifier (it uses {', '.join(c.value for c in required)}); "
            f"got {type(model).__name__}. Wrap your model in ImageClassifier."
        )
    missing = [c for c in required if c not in model.capabilities()]
    if missing:
        notes = model.capability_notes()
        why = "".join(f" {c.value}: {notes[c]}" for c in missing if c in notes)
        raise ModelRequirementError(
            f"{who} needs a model with {', '.join(c.value for c in missing)}, which "
            f"{type(model).__name__} lacks.{why}"
        )
