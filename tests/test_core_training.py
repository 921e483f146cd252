from __future__ import annotations

import pytest
import torch

from backdoor_toolkit.data import dataset_spec
from backdoor_toolkit.errors import BdtkError
from backdoor_toolkit.interfaces import TrainingSettings
from backdoor_toolkit.models import create_model
from backdoor_toolkit.training import augment_batch, resolve_device, seed_everything, train_classifier


def _settings(epochs: int = 3) -> TrainingSettings:
    return TrainingSettings(
        epochs=epochs,
        batch_size=32,
        lr=0.05,
        weight_decay=0.0,
        augment=True,
        hflip=True,
        device=torch.device("cpu"),
    )


def _separable(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 28, 28, generator=gen) * 0.2
    images[labels == 1, :, 8:20, 8:20] += 0.8  # a bright centre square survives crops and flips
    return images, labels


def test_augment_keeps_shape_and_range_and_is_seeded() -> None:
    x = torch.rand(16, 3, 32, 32)
    a = augment_batch(x, True, torch.Generator().manual_seed(1))
    b = augment_batch(x, True, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


def test_training_learns_and_is_reproducible() -> None:
    images, labels = _separable()
    spec = dataset_spec("fashion-mnist")
    losses = []
    weights = []
    for _ in range(2):
        seed_everything(0)
        model = create_model("small-cnn", spec)
        losses.append(train_classifier(model, images, labels, _settings(), seed=0))
        weights.append(model.fc.weight.detach().clone())
    assert losses[0][-1] < losses[0][0]
    assert losses[0] == losses[1]
    assert torch.equal(weights[0], weights[1])


def test_batch_hook_sees_every_batch() -> None:
    images, labels = _separable(64)
    calls = []

    def hook(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x.shape[0])
        return x, y

    model = create_model("small-cnn", dataset_spec("fashion-mnist"))
    train_classifier(model, images, labels, _settings(1), seed=0, batch_hook=hook)
    assert sum(calls) == 64


def test_a_frozen_part_keeps_its_weights_and_its_batchnorm_statistics() -> None:
    """Fine-tuning the head alone must leave everything else as it was: frozen BatchNorm layers
    updated their running statistics from every batch in train mode."""
    images, labels = _separable(64)
    model = create_model("small-cnn", dataset_spec("fashion-mnist"))
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_classifier(model, images, labels, _settings(1), seed=0)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc.bias", "fc.weight"]
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.requires_grad_(True)  # a trainable BatchNorm follows the batches as before
    train_classifier(model, images, labels, _settings(1), seed=0)
    assert not torch.equal(bn.running_mean, before[next(k for k in before if k.endswith("running_mean"))])


def test_unavailable_device_is_a_clear_error() -> None:
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(BdtkError, match="Unknown device"):
        resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(BdtkError, match="CUDA is not available"):
            resolve_device("cuda")
