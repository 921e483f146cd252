"""A tiny backdoored model for the baselines' tests: a small-cnn that has learnt a planted trigger.

Four classes, each a bright bar in its own place on 16×16 noise; a 3×3 checkerboard in the
bottom-right corner (where no bar reaches) sends 10% of the training images to class 0. The model
reaches 100% clean accuracy and 100% ASR on fresh toy images in a few seconds on one CPU thread,
and is trained once per test session (`backdoored_toy` is cached; tests work on deep copies).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from backdoor_toolkit import (
    DataSpec,
    DefenseData,
    ImageClassifier,
    ImageData,
    TrainingSettings,
    train_classifier,
)
from backdoor_toolkit.models.small_cnn import SmallCNN

SPEC = DataSpec("backdoor-toy", 4, 1, 16, 16, (0.5,), (0.5,), hflip=False)
TARGET = 0
CPU = torch.device("cpu")
# class c: a bright bar; none reaches the trigger's corner (rows and columns 13–15)
BARS = [
    (slice(1, 5), slice(2, 14)),
    (slice(2, 14), slice(1, 5)),
    (slice(6, 10), slice(2, 12)),
    (slice(2, 12), slice(6, 10)),
]
CHECKER = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """`n` float toy images in [0, 1] with balanced labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = torch.rand(n, 1, 16, 16, generator=gen) * 0.35
    for c, (rows, cols) in enumerate(BARS):
        x[labels == c, :, rows, cols] += 0.6
    return x.clamp(0, 1), labels


def stamp(x: Tensor) -> Tensor:
    """The planted trigger."""
    out = x.clone()
    out[..., 13:16, 13:16] = CHECKER
    return out


def to_uint8(x: Tensor) -> Tensor:
    return (x * 255).round().to(torch.uint8)


def scores(model: nn.Module) -> tuple[float, float]:
    """(ASR on non-target test images, clean accuracy) on 400 fresh toy images."""
    x, y = images(400, 4)
    x = to_uint8(x).float() / 255
    victims = y != TARGET
    model.eval()
    with torch.no_grad():
        ba = float((model(x).argmax(1) == y).float().mean())
        asr = float((model(stamp(x[victims])).argmax(1) == TARGET).float().mean())
    return asr, ba


@functools.cache
def backdoored_toy() -> tuple[ImageClassifier, DefenseData]:
    """The backdoored model (eval mode) and a clean budget of 128 training and 64 validation images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread than on two contended ones
    try:
        torch.manual_seed(0)
        x, y = images(256, 1)
        poison = torch.randperm(256)[:26]
        x[poison], y[poison] = stamp(x[poison]), TARGET
        model = SmallCNN(1, 4, SPEC.mean, SPEC.std, width=8)
        settings = TrainingSettings(8, 32, 0.05, 5e-4, False, False, CPU)
        train_classifier(model, to_uint8(x), y, settings, seed=0)
    finally:
        torch.set_num_threads(threads)
    train, val = (ImageData(to_uint8(xs), ys) for xs, ys in (images(128, 2), images(64, 3)))
    return model.eval(), DefenseData(SPEC, train, val, torch.arange(128), torch.arange(128, 192))
