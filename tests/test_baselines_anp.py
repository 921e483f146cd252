"""ANP: masks stay in [0, 1], perturbations in the ε-box, threshold pruning is exact, BN required."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from bdtk_baselines.anp import ANP, ANPConfig, NeuronMasks, neurons_below, prune_neurons
from torch import nn
from torch.nn import functional as F

from backdoor_toolkit import (
    Capability,
    ConfigError,
    DefenseData,
    ImageClassifier,
    ModelRequirementError,
    NonFiniteError,
    create_model,
    get_purifier,
)
from backdoor_toolkit.data import dataset_spec
from backdoor_toolkit.models import check_capabilities

SPEC = dataset_spec("fashion-mnist")
CPU = torch.device("cpu")


def test_perturbations_stay_within_eps_and_raise_the_loss(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = separable_model
    model = copy.deepcopy(model).eval()
    x, y = data.train.float_images(), data.train.labels
    with torch.no_grad():  # ANP works with batch statistics: the train-mode forward, on a copy
        natural = float(F.cross_entropy(copy.deepcopy(model).train()(x), y))
    running = [torch.as_tensor(bn.running_mean).clone() for bn in model.batchnorms()]
    neurons = NeuronMasks(model, CPU)
    eps = 0.3
    neurons.ascend(x, y, eps, torch.Generator().manual_seed(0))
    for h in neurons.hooks:
        assert h.delta.abs().max() <= eps + 1e-6 and h.xi.abs().max() <= eps + 1e-6
        assert not h.delta.requires_grad
    assert any(h.delta.abs().max() > 0.5 * eps for h in neurons.hooks)
    neurons.set_perturbed(True)
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) > natural
    neurons.set_perturbed(False)
    with torch.no_grad():  # unperturbed masks of one reproduce the plain batch-statistics forward
        assert torch.isclose(F.cross_entropy(model(x), y), torch.tensor(natural), atol=1e-5)
    # the running statistics of the model being purified are left alone
    assert all(
        torch.equal(r, torch.as_tensor(bn.running_mean))
        for r, bn in zip(running, model.batchnorms(), strict=True)
    )
    neurons.remove()
    assert all(not bn._forward_hooks for bn in model.batchnorms())


def test_unclipped_perturbations_reach_past_eps_as_in_the_authors_code(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = separable_model
    x, y = data.train.float_images(), data.train.labels
    neurons = NeuronMasks(copy.deepcopy(model).eval(), CPU)
    neurons.ascend(x, y, 0.3, torch.Generator().manual_seed(0), clip=False)
    largest = max(float(h.delta.abs().max()) for h in neurons.hooks)
    assert 0.3 < largest <= 0.6 + 1e-6
    neurons.remove()


def test_the_reference_preset_changes_the_masks_and_the_defaults_keep_their_hash(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    from backdoor_toolkit.config import hashed_config

    model, data = separable_model
    plain = ANP(ANPConfig(iterations=4, batch_size=24), seed=0, device=CPU).optimise_masks(
        copy.deepcopy(model), data
    )
    values = {**ANP.presets["reference"].values, "iterations": 4, "batch_size": 24}
    reference = ANP(ANPConfig(**values), seed=0, device=CPU).optimise_masks(copy.deepcopy(model), data)
    assert any(not torch.equal(a, b) for a, b in zip(plain, reference, strict=True))
    assert {"augment", "clip_perturbation"}.isdisjoint(hashed_config(ANPConfig()))


def test_masks_stay_in_unit_interval_and_weights_untouched(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = separable_model
    model = copy.deepcopy(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    anp = ANP(ANPConfig(iterations=6, batch_size=24, lr=5.0), seed=0, device=CPU)
    masks = anp.optimise_masks(model, data)
    flat = torch.cat(masks)
    assert flat.numel() == sum(bn.num_features for bn in model.batchnorms())
    assert flat.min() >= 0 and flat.max() <= 1
    assert (flat < 1).any()  # a big learning rate moved masks, and the clip caught them
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.requires_grad for p in model.parameters())
    assert all(not bn._forward_hooks for bn in model.batchnorms())


def test_threshold_pruning_removes_exactly_the_neurons_below_it() -> None:
    torch.manual_seed(0)
    model = create_model("small-cnn", SPEC)
    bns = model.batchnorms()
    masks = [torch.rand(bn.num_features) for bn in bns]
    masks[0][3] = 0.2  # on the threshold: kept
    before = [bn.weight.detach().clone() for bn in bns]
    pruned = neurons_below(masks, 0.2)
    prune_neurons(bns, pruned)
    for layer, (bn, m, w) in enumerate(zip(bns, masks, before, strict=True)):
        below = m < 0.2
        assert torch.count_nonzero(bn.weight[below]) == 0
        assert torch.equal(bn.weight[~below], w[~below])
        assert {c for lay, c in pruned if lay == layer} == set(torch.nonzero(below).flatten().tolist())
    assert (0, 3) not in pruned


def test_purify_by_val_budget_keeps_val_accuracy(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = separable_model
    model = copy.deepcopy(model)
    config = ANPConfig(iterations=3, batch_size=24, prune_by="val-budget", max_val_drop=0.05, step=0.05)
    result = ANP(config, seed=0, device=CPU).purify(model, data)
    diag = result.diagnostics
    assert diag["val_accuracy_before"] - diag["val_accuracy_after"] <= 0.05
    assert diag["pruned_count"] == len(diag["pruned_neurons"]) == sum(diag["pruned_per_layer"])
    zeroed = sum(int((bn.weight == 0).sum()) for bn in model.batchnorms())
    assert zeroed == diag["pruned_count"]


def _without_val(data: DefenseData) -> DefenseData:
    empty = data.val.subset(torch.empty(0, dtype=torch.long))
    return dataclasses.replace(data, val=empty, index_val=torch.empty(0, dtype=torch.long))


def test_a_val_budget_without_val_images_is_refused_not_pruned_to_the_maximum(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    """With no val image, the accuracy is NaN, NaN comparisons are False, and the budget never
    stopped the pruning: half of all neurons went, reported as within budget."""
    model, data = separable_model
    config = ANPConfig(iterations=1, batch_size=24, prune_by="val-budget")
    with pytest.raises(ConfigError, match="val split, which is empty"):
        ANP(config, seed=0, device=CPU).purify(copy.deepcopy(model), _without_val(data))
    # the fixed threshold reads no val data: it still runs
    ANP(ANPConfig(iterations=1, batch_size=24), seed=0, device=CPU).purify(
        copy.deepcopy(model), _without_val(data)
    )


def test_a_loss_that_becomes_nan_is_an_error_not_unpruned_neurons(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = separable_model
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="anp: the mask loss became nan at step 1"):
        ANP(ANPConfig(iterations=2, batch_size=24), seed=0, device=CPU).optimise_masks(model, data)


class _NoBatchNorm(ImageClassifier):
    def __init__(self) -> None:
        super().__init__((0.5,), (0.5,), 2)
        self.stem = nn.Identity()
        self.groups = nn.ModuleList([nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())])
        self.final = nn.Identity()
        self.fc = nn.Linear(4, 2)


def test_model_without_batchnorm_is_refused_clearly(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model = _NoBatchNorm()
    _, data = separable_model
    assert Capability.BATCHNORM in ANP.meta.requires
    with pytest.raises(ModelRequirementError, match=r"'anp'.*batchnorm.*_NoBatchNorm"):
        check_capabilities(model, ANP.meta.requires, "Defense 'anp'")
    with pytest.raises(ModelRequirementError, match="no BatchNorm2d layer"):
        ANP(ANPConfig(iterations=1), seed=0, device=CPU).purify(model, data)


def test_baselines_are_registered_with_their_requirements() -> None:
    expected = {
        "finetune": (),
        "fine-pruning": (Capability.FINAL_MAPS,),
        "nad": (Capability.LAYER_GROUPS,),
        "anp": (Capability.BATCHNORM,),
    }
    for name, requires in expected.items():
        assert get_purifier(name).meta.requires == requires
    assert get_purifier("anp") is ANP
