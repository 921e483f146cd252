"""Fine-pruning: dormant channels go first, the val budget stops pruning, pruned stays pruned."""

from __future__ import annotations

import copy

import torch
from bdtk_baselines.fine_pruning import ChannelMask, FinePruning, FinePruningConfig, mean_channel_activation

from backdoor_toolkit import DefenseData, ImageClassifier
from backdoor_toolkit.data import dataset_spec

SPEC = dataset_spec("fashion-mnist")
CPU = torch.device("cpu")


def _purify(model: ImageClassifier, data: DefenseData, **overrides: object) -> tuple[ImageClassifier, dict]:
    model = copy.deepcopy(model)
    config = FinePruningConfig.model_validate({"epochs": 1, "batch_size": 32, **overrides})
    result = FinePruning(config, seed=0, device=CPU).purify(model, data)
    assert result.model is model
    return model, result.diagnostics


def test_pruned_channels_stay_zero_through_fine_tuning(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = separable_model
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


def test_pruning_stops_within_the_validation_budget(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = separable_model
    budget = 0.02
    _, diag = _purify(model, data, max_val_drop=budget, step=0.05)
    base = diag["val_accuracy_before"]
    assert base > 0.9  # the fixture model has learnt the task
    assert base - diag["val_accuracy_pruned"] <= budget
    counts = [count for count, _ in diag["val_curve"]]
    if diag["pruned_count"] < counts[-1]:  # stopped early: the next step broke the budget
        assert base - diag["val_curve"][-1][1] > budget
        assert counts[-2] == diag["pruned_count"]


def test_nothing_pruned_leaves_no_hook(separable_model: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = separable_model
    purified, diag = _purify(model, data, step=0.01, max_prune_ratio=0.005)
    assert diag["pruned_count"] == 0 and diag["pruned_channels"] == []
    assert not purified.final._forward_hooks


def test_channel_mask_zeroes_only_masked_channels() -> None:
    keep = torch.tensor([1.0, 0.0, 1.0])
    out = ChannelMask(keep)(torch.nn.Identity(), (), torch.ones(2, 3, 4, 4))
    assert out[:, 1].abs().sum() == 0 and torch.equal(out[:, [0, 2]], torch.ones(2, 2, 4, 4))
    assert ChannelMask(keep).pruned == [1]
