"""Fine-pruning: dormant channels go first, the val budget stops pruning, pruned stays pruned, and
the pruning is part of the weights without changing any output."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from bdtk_baselines.fine_pruning import (
    ChannelMask,
    FinePruning,
    FinePruningConfig,
    fold_mask,
    mean_channel_activation,
)
from torch import nn

from backdoor_toolkit import ConfigError, DefenseData, ImageClassifier, create_model
from backdoor_toolkit.data import DataSpec, dataset_spec

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


def test_an_empty_val_split_is_refused(separable_model: tuple[ImageClassifier, DefenseData]) -> None:
    """The val budget is fine-pruning's only stop: without val images it pruned its maximum."""
    model, data = separable_model
    empty = torch.empty(0, dtype=torch.long)
    data = dataclasses.replace(data, val=data.val.subset(empty), index_val=empty)
    with pytest.raises(ConfigError, match="fine-pruning chooses how many channels to prune"):
        FinePruning(FinePruningConfig(epochs=1), seed=0, device=torch.device("cpu")).purify(
            copy.deepcopy(model), data
        )


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


# --- the pruning becomes part of the weights ------------------------------------------------------


def _with_moved_batchnorms(model: ImageClassifier) -> ImageClassifier:
    """BatchNorm statistics and affine values far from their init, so that a folding into the
    wrong layer or channel would change the outputs."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize(
    ("name", "folded_into"),
    [
        ("small-cnn", "groups.2.1"),  # conv-BN-ReLU: the last stage's BatchNorm
        ("vgg11-bn", "groups.4.4"),  # conv-BN-ReLU-max-pool
        ("wrn-16-1", "final.0"),  # final = BN-ReLU
        ("preact-resnet18", "final.0"),
        ("resnet18", "fc"),  # the maps are ReLU(residual sum): no single layer makes them
        ("preact-resnet18-bb", "fc"),  # the maps are an unrectified residual sum
    ],
)
def test_folding_the_mask_keeps_every_output_and_the_weights_alone_reproduce_them(
    name: str, folded_into: str
) -> None:
    torch.manual_seed(0)
    spec = DataSpec("x", 5, 3, 16, 16, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), False)
    model = _with_moved_batchnorms(create_model(name, spec))
    x = torch.rand(6, 3, 16, 16)
    channels = int(model.final_maps(x).shape[1])
    keep = torch.ones(channels)
    keep[::3] = 0
    mask = ChannelMask(keep)
    handle = model.final.register_forward_hook(mask)
    with torch.no_grad():
        masked, masked_maps = model(x), model.final_maps(x)
    assert fold_mask(model, mask, handle) == folded_into
    fresh = create_model(name, spec).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        # folding changes no output of the pruned model, and its state dict alone reproduces them
        assert torch.equal(model(x), masked)
        assert torch.equal(fresh(x), masked)
        if folded_into == "fc":  # the head ignores the channels; the mask keeps the maps as they were
            assert model.final._forward_hooks and torch.equal(model.final_maps(x), masked_maps)
        else:  # the weights are the whole pruning: the channels are zero, and no hook is left
            assert not model.final._forward_hooks
            assert torch.count_nonzero(fresh.final_maps(x)[:, mask.pruned]) == 0
            assert torch.equal(fresh.final_maps(x), masked_maps)


def test_channels_zeroed_in_the_weights_stay_zero_under_further_fine_tuning(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = separable_model
    purified, diag = _purify(model, data, max_val_drop=1.0, max_prune_ratio=0.5)
    assert diag["pruning_in_weights"] == "groups.2.1" and not purified.final._forward_hooks
    pruned = diag["pruned_channels"]
    # someone fine-tunes the released weights: a ReLU at zero passes no gradient to the zeroed channels
    optimizer = torch.optim.SGD(purified.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    purified.train()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(purified(data.train.float_images()), data.train.labels).backward()
        optimizer.step()
    maps = purified.eval().final_maps(data.val.float_images())
    assert torch.count_nonzero(maps[:, pruned]) == 0
