"""Tiny inputs for the conformance checks: a 4-class 1×16×16 dataset and a barely-trained model.

A check has to run every plugin in seconds on a CPU, yet on inputs real enough to catch a broken
contract (BatchNorm statistics and weights away from their init, balanced labels, a defender's
train/validation split). These builders make such inputs deterministically from a seed; the
checks and the pytest fixtures both use them, and plugin authors may use them in their own tests.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..data import DataSpec, DefenseData, ImageData
from ..models import ImageClassifier, create_model
from ..training import TrainingSettings, train_classifier

#: The tiny dataset every check uses unless given another spec: 4 classes, 1×16×16 images.
TINY_SPEC = DataSpec("bdtk-tiny", 4, 1, 16, 16, (0.5,), (0.5,), hflip=False)
TINY_SIZE = 64


def tiny_images(spec: DataSpec = TINY_SPEC, n: int = TINY_SIZE, seed: int = 0) -> ImageData:
    """`n` random uint8 images with balanced labels."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *spec.image_shape), generator=gen, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % spec.num_classes)


def tiny_defense_data(spec: DataSpec = TINY_SPEC, seed: int = 0) -> DefenseData:
    """A defender's budget of 48 training and 16 validation images."""
    data = tiny_images(spec, TINY_SIZE, seed)
    index = torch.arange(TINY_SIZE)
    return DefenseData(spec, data.subset(index[:48]), data.subset(index[48:]), index[:48], index[48:])


def tiny_settings(device: torch.device, spec: DataSpec = TINY_SPEC) -> TrainingSettings:
    return TrainingSettings(
        epochs=1, batch_size=32, lr=0.05, weight_decay=0.0, augment=False, hflip=spec.hflip, device=device
    )


def tiny_model(
    spec: DataSpec = TINY_SPEC, device: torch.device | None = None, seed: int = 0
) -> ImageClassifier:
    """A `small-cnn` after two SGD steps, so BatchNorm statistics and weights are not at their init.

    Trained once per (spec, seed) on the CPU; each call returns a fresh copy on `device`.
    """
    model = create_model("small-cnn", spec)
    model.load_state_dict(_tiny_weights(spec, seed))
    return model.to(device or torch.device("cpu")).eval()


@functools.cache
def _tiny_weights(spec: DataSpec, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    model = create_model("small-cnn", spec)
    data = tiny_images(spec, TINY_SIZE, seed + 1)
    settings = tiny_settings(torch.device("cpu"), spec)
    train_classifier(model, data.images, data.labels, settings, seed=seed, description="tiny")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
