"""NAD: the attention map and its loss on hand-made tensors, and a short distillation run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bdtk_baselines.nad import NAD, NADConfig, attention_loss, attention_map

from backdoor_toolkit import DefenseData, ImageClassifier, ModelRequirementError

CPU = torch.device("cpu")


def test_attention_map_by_hand() -> None:
    # one image, two channels, 1×2 positions: |a|^2 averaged over channels is [ (1+9)/2, (4+0)/2 ]
    a = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    raw = torch.tensor([5.0, 2.0])
    assert torch.allclose(attention_map(a, 2.0), (raw / raw.norm()).view(1, 2))
    # p = 1 uses absolute values
    assert torch.allclose(attention_map(a, 1.0), (torch.tensor([2.0, 1.0]) / math.sqrt(5)).view(1, 2))


def test_attention_loss_by_hand() -> None:
    a = torch.tensor([[[[1.0, 0.0]]]])  # map [1, 0]
    b = torch.tensor([[[[0.0, 1.0]]]])  # map [0, 1]
    # squared differences 1 and 1, averaged over the two positions
    assert torch.isclose(attention_loss(a, b, 2.0), torch.tensor(1.0))
    # normalised maps ignore scale and sign, so a rescaled copy costs nothing
    x = torch.randn(3, 4, 5, 5)
    assert attention_loss(x, -3 * x, 2.0) < 1e-12
    assert attention_loss(x, torch.randn(3, 4, 5, 5), 2.0) > 0


def test_attention_loss_pulls_student_to_teacher() -> None:
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4)
    loss = attention_loss(student, teacher, 2.0)
    (grad,) = torch.autograd.grad(loss, student)
    with torch.no_grad():
        stepped = student - 0.5 * grad / grad.norm()
    assert attention_loss(stepped, teacher, 2.0) < loss.detach()


def test_nad_runs_and_reports_teacher_and_removes_hooks(
    separable_model: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = copy.deepcopy(separable_model[0]), separable_model[1]
    config = NADConfig(epochs=1, teacher_epochs=1, batch_size=16)
    before = model.fc.weight.detach().clone()
    result = NAD(config, seed=0, device=CPU).purify(model, data)
    diag = result.diagnostics
    assert result.model is model and not torch.equal(model.fc.weight, before)
    assert 0 <= diag["teacher_val_accuracy"] <= 1 and 0 <= diag["val_accuracy_after"] <= 1
    assert diag["distilled_groups"] == [0, 1, 2]
    assert math.isfinite(diag["final_loss"])
    assert all(not g._forward_hooks for g in model.layer_groups())


def test_nad_needs_as_many_groups_as_betas(separable_model: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = copy.deepcopy(separable_model[0]), separable_model[1]  # small-cnn: three groups
    config = NADConfig(betas=[1.0, 1.0, 1.0, 1.0], epochs=1, teacher_epochs=1)
    with pytest.raises(ModelRequirementError, match=r"4 layer groups.*has 3"):
        NAD(config, seed=0, device=CPU).purify(model, data)
