"""Fine-pruning: dormant channels go first, the val budget stops pruning, pruned stays pruned."""

from __future__ import annotations

import copy

import pytest
import torch
from bdtk_baselines.fine_pruning import ChannelMask, FinePruning, FinePruningConfig, mean_channel_activation

from backdoor_toolkit import DefenseData, ImageClassifier, ImageData, TrainingSettings, create_model
from backdoor_toolkit.data import dataset_spec
from backdoor_toolkit.training import train_classifier

SPEC = dataset_spec("fashion-mnist")
CPU = torch.device("cpu")


def _separable(n: int, seed: int) -> ImageData:
    """Two classes told apart by a bright centre square; uint8 like real data, 16×16 for speed."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 16, 16, generator=gen) * 0.3
    images[labels == 1, :, 4:12, 4:12] += 0.7
    return ImageData((images * 255).round().to(torch.uint8), labels)


@pytest.fixture(scope="module")
def trained() -> tuple[ImageClassifier, DefenseData]:
    torch.manual_seed(0)
    model = create_model("small-cnn", SPEC)
    train = _separable(96, 0)
    settings = TrainingSettings(2, 32, 0.05, 0.0, False, False, CPU)
    train_classifier(model, train.images, train.labels, settings, seed=0)
    data = DefenseData(SPEC, _separable(48, 1), _separable(48, 2), torch.arange(48), torch.arange(48, 96))
    return model, data


def _purify(model: ImageClassifier, data: DefenseData, **overrides: object) -> tuple[ImageClassifier, dict]:
    model = copy.deepcopy(model)
    config = FinePruningConfig.model_validate({"epochs": 1, "batch_size": 32, **overrides})
    result = FinePruning(config, seed=0, device=CPU).purify(model, data)
    assert result.model is model
    return model, result.diagnostics


def test_pruned_channels_stay_zero_through_fine_tuning(trained: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = trained
    before = copy.deepcopy(model)
    purified, diag = _purify(model, data, max_val_drop=1.0, max_prune_ratio=0.5, lr=0.1)
    pruned = diag["pruned_channels"]
    assert len(pruned) == diag["pruned_count"] == 64  # half of small-cnn's 128 channels
    # the least active channels on the clean train part were the ones pruned
    activation = mean_channel_activation(before, data.train.images, data.train.labels, CPU)
    assert set(pruned) == set(torch.argsort(activation)[:64].tolist())
    # fine-tuning changed the network, yet the pruned channels output exactly zero
    assert not torch.equal(purified.fc.weight, before.fc.weight)
    maps = purified.final_maps(data.val.float_images())
    assert torch.count_nonzero(maps[:, pruned]) == 0
    assert torch.count_nonzero(before.final_maps(data.val.float_images())[:, pruned]) > 0
    # the mask travels with the model (e.g. the benchmark deep-copies it)
    assert torch.count_nonzero(copy.deepcopy(purified).final_maps(data.val.float_images())[:, pruned]) == 0


def test_pruning_stops_within_the_validation_budget(trained: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = trained
    budget = 0.02
    _, diag = _purify(model, data, max_val_drop=budget, step=0.05)
    base = diag["val_accuracy_before"]
    assert base > 0.9  # the fixture model has learnt the task
    assert base - diag["val_accuracy_pruned"] <= budget
    counts = [count for count, _ in diag["val_curve"]]
    if diag["pruned_count"] < counts[-1]:  # stopped early: the next step broke the budget
        assert base - diag["val_curve"][-1][1] > budget
        assert counts[-2] == diag["pruned_count"]


def test_nothing_pruned_leaves_no_hook(trained: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = trained
    purified, diag = _purify(model, data, step=0.01, max_prune_ratio=0.005)
    assert diag["pruned_count"] == 0 and diag["pruned_channels"] == []
    assert not purified.final._forward_hooks


def test_channel_mask_zeroes_only_masked_channels() -> None:
    keep = torch.tensor([1.0, 0.0, 1.0])
    out = ChannelMask(keep)(torch.nn.Identity(), (), torch.ones(2, 3, 4, 4))
    assert out[:, 1].abs().sum() == 0 and torch.equal(out[:, [0, 2]], torch.ones(2, 2, 4, 4))
    assert ChannelMask(keep).pruned == [1]
