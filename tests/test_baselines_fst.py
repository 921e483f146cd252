"""FST: the head's re-initialisation and norm constraint, the penalty's push away from the
backdoored head, and a planted backdoor it removes.

The backdoor test uses the toy of `planted_backdoor` and runs FST at the paper's settings except
the batch size: the toy's clean budget is 128 images, so the default batch of 128 would be one
step per epoch, ten in all, too few to train a new head (clean accuracy ends at 25–73% over seeds
0–2); batches of 32 make forty, about half of what the paper's 1,000 CIFAR-10 images at 128 give.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bdtk_baselines.fst import FST, FSTConfig, project_to_norm, reinitialise_head
from planted_backdoor import CPU, backdoored_toy, scores
from torch import nn
from torch.nn import functional as F

from backdoor_toolkit import (
    Capability,
    DefenseData,
    ImageClassifier,
    ModelRequirementError,
    get_purifier,
    resolve_config,
)

TOY = {"batch_size": 32}  # see the module docstring

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backdoored() -> tuple[ImageClassifier, DefenseData]:
    return backdoored_toy()


def test_head_reinitialisation_is_seeded_and_in_nn_linear_range() -> None:
    head = nn.Linear(32, 4)
    before = head.weight.detach().clone()
    reinitialise_head(head, torch.Generator().manual_seed(0))
    first = (head.weight.detach().clone(), head.bias.detach().clone())
    bound = 1 / math.sqrt(32)
    assert float(first[0].abs().max()) <= bound and float(first[1].abs().max()) <= bound
    assert not torch.equal(first[0], before)
    reinitialise_head(head, torch.Generator().manual_seed(0))
    assert torch.equal(head.weight, first[0]) and torch.equal(head.bias, first[1])
    reinitialise_head(head, torch.Generator().manual_seed(1))
    assert not torch.equal(head.weight, first[0])


def test_projection_keeps_the_direction_and_sets_the_norm() -> None:
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # Frobenius norm 5
    project_to_norm(w, 10.0)
    assert torch.allclose(w, torch.tensor([[6.0, 0.0], [0.0, 8.0]]))
    zero = torch.zeros(2, 2)
    project_to_norm(zero, 1.0)  # nothing to rescale: left alone rather than divided by zero
    assert torch.equal(zero, torch.zeros(2, 2))


def test_removes_the_planted_backdoor_and_pushes_the_head_away(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    original, data = backdoored
    asr_before, ba_before = scores(original)
    assert asr_before > 0.9 and ba_before > 0.95
    result = FST(FSTConfig(**TOY), seed=0, device=CPU).purify(copy.deepcopy(original), data)
    asr, ba = scores(result.model)
    assert asr < asr_before - 0.5, (asr_before, asr)
    assert ba > 0.9, ba
    # the constraint ‖W‖ = ‖W_ori‖ holds after training, and the head is a new one
    head, old = result.model.fc.weight.detach(), original.fc.weight.detach()
    assert torch.isclose(head.norm(), old.norm(), rtol=1e-5)
    diag = result.diagnostics
    assert math.isclose(diag["head_norm"], diag["original_head_norm"], rel_tol=1e-5)
    assert math.isclose(
        diag["head_cosine"], float(F.cosine_similarity(head.flatten(), old.flatten(), dim=0)), abs_tol=1e-6
    )

    # without the penalty (α = 0: FT-init in the paper) the new head ends nearer the old one
    plain = FST(FSTConfig(**TOY, alpha=0.0), seed=0, device=CPU).purify(copy.deepcopy(original), data)
    assert diag["head_cosine"] < plain.diagnostics["head_cosine"] - 0.15


def test_same_seed_same_model(backdoored: tuple[ImageClassifier, DefenseData]) -> None:
    original, data = backdoored
    config = FSTConfig(epochs=1, batch_size=64)
    a = FST(config, seed=3, device=CPU).purify(copy.deepcopy(original), data).model
    b = FST(config, seed=3, device=CPU).purify(copy.deepcopy(original), data).model
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_model_without_a_linear_head_is_refused(backdoored: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    model.fc = nn.Sequential(nn.Linear(32, 4))  # type: ignore[assignment]
    with pytest.raises(ModelRequirementError, match=r"'fst'.*no nn.Linear `fc`"):
        FST(FSTConfig(epochs=1), seed=0, device=CPU).purify(model, data)


def test_registered_with_its_requirement_and_the_papers_recipes() -> None:
    assert get_purifier("fst") is FST
    assert FST.meta.requires == (Capability.FEATURES,)
    cifar100 = resolve_config("purifier", "fst:cifar100")
    assert (cifar100.lr, cifar100.alpha, cifar100.epochs) == (0.001, 0.001, 15)  # type: ignore[attr-defined]
    gtsrb = resolve_config("purifier", "fst", "gtsrb")
    assert (gtsrb.lr, gtsrb.alpha, gtsrb.epochs) == (0.01, 0.1, 15)  # type: ignore[attr-defined]
