from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoor_toolkit.data import dataset_spec
from backdoor_toolkit.errors import ModelRequirementError, UnknownNameError
from backdoor_toolkit.models import (
    Capability,
    ImageClassifier,
    available_models,
    check_capabilities,
    create_model,
)

FAST = ["wrn-16-1", "small-cnn", "vgg11-bn", "preact-resnet18", "preact-resnet18-bb", "resnet18", "wrn-16-2"]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_every_model_exposes_the_interface(name: str, dataset: str) -> None:
    spec = dataset_spec(dataset)
    model = create_model(name, spec).eval()
    x = torch.rand(2, *spec.image_shape)
    logits = model(x)
    assert logits.shape == (2, spec.num_classes)
    feats = model.features(x)
    assert feats.dim() == 2 and feats.shape[0] == 2
    assert torch.allclose(model.fc(feats), logits, atol=1e-5)
    maps = model.final_maps(x)
    assert maps.dim() == 4 and maps.shape[1] == feats.shape[1]
    assert len(model.layer_groups()) >= 3
    assert model.batchnorms()
    assert model.capabilities() == set(Capability)


def test_zoo_lists_all_models_and_rejects_unknown() -> None:
    assert {m.name for m in available_models()} >= set(FAST)
    with pytest.raises(UnknownNameError, match="Did you mean 'wrn-16-1'"):
        create_model("wrn16-1", dataset_spec("cifar10"))


def test_normalisation_is_the_first_layer() -> None:
    spec = dataset_spec("fashion-mnist")
    model = create_model("small-cnn", spec)
    x = torch.full((1, 1, 28, 28), spec.mean[0])
    assert torch.allclose(model.normalize(x), torch.zeros_like(x), atol=1e-6)


class _NoBatchNorm(ImageClassifier):
    def __init__(self) -> None:
        super().__init__((0.5,), (0.5,), 10)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.groups = nn.ModuleList([nn.ReLU()])
        self.final = nn.Identity()
        self.fc = nn.Linear(4, 10)


def test_missing_capability_is_a_clear_error() -> None:
    model = _NoBatchNorm()
    check_capabilities(model, [Capability.FEATURES], "x")
    with pytest.raises(ModelRequirementError, match="'anp' needs a model with batchnorm"):
        check_capabilities(model, [Capability.BATCHNORM], "'anp'")
    with pytest.raises(ModelRequirementError, match="ImageClassifier"):
        check_capabilities(nn.Linear(2, 2), [Capability.FEATURES], "x")
