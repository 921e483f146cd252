"""I-BAU: the hypergradient against the implicit function theorem, the inner maximisation, and a
planted backdoor it removes.

The backdoor test uses the toy of `planted_backdoor` (a 3×3 checkerboard in the corner of a
four-class toy, 10% of the training images poisoned, 128 clean images to purify with) and runs
I-BAU at its defaults except one: the perturbation rides on 10% of each outer batch instead of
the authors' 1%. The toy's budget makes ten outer steps in all, so 1% is a single perturbed image
per step, ten in the whole run (the authors' 5,000 images give 250); with it the toy keeps 90–100%
ASR over seeds 0–2. A control run with the perturbation bound set to zero (the same Adam steps on
clean batches, nothing adversarial) keeps the backdoor, so the drop is the unlearning's doing and
not that of training on clean data.
"""

from __future__ import annotations

import copy

import pytest
import torch
from bdtk_baselines.ibau import IBAU, IBAUConfig, implicit_hypergradient, inner_objective, outer_loss
from planted_backdoor import CPU, SPEC, TARGET, backdoored_toy, scores
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from backdoor_toolkit import DefenseData, ImageClassifier, get_purifier

TOY = {"perturbed_fraction": 0.1}  # see the module docstring

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backdoored() -> tuple[ImageClassifier, DefenseData]:
    return backdoored_toy()


def test_hypergradient_matches_the_implicit_function_theorem() -> None:
    """With enough fixed-point iterations the result is ∂_θL − (∇²_θδ G)ᵀ (∇²_δδ G)⁻¹ ∂_δL,
    computed here from the exact Hessians of a linear model (the clip stays inactive)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = 0.3 + 0.4 * torch.rand(6, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    delta = 0.02 * torch.randn(1, 1, 2, 2)
    rows = torch.tensor([True, False, True, False, False, True])
    reg, step = 1.0, 0.1  # λ large enough that G is strongly convex in δ: the fixed point exists
    params = list(model.parameters())
    _, grads = implicit_hypergradient(model, params, delta, x, y, rows, reg=reg, step=step, iterations=400)

    names, shapes = [n for n, _ in model.named_parameters()], [p.shape for p in params]
    theta = torch.cat([p.detach().flatten() for p in params])

    def unflat(t: Tensor) -> dict[str, Tensor]:
        chunks = t.split([s.numel() for s in shapes])
        return {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}

    def call(t: Tensor) -> nn.Module:
        return lambda inp: functional_call(model, unflat(t), (inp,))  # type: ignore[return-value]

    def inner_grad(d: Tensor, t: Tensor) -> Tensor:
        d = d.view(1, 1, 2, 2)
        return torch.autograd.grad(inner_objective(call(t), x, y, d, reg), d, create_graph=True)[0].flatten()

    d0 = delta.flatten().requires_grad_(True)
    hessian = torch.autograd.functional.jacobian(lambda d: inner_grad(d, theta), d0)  # ∇²_δδ G
    mixed = torch.autograd.functional.jacobian(lambda t: inner_grad(d0, t), theta)  # ∂_θ ∇_δ G
    t0 = theta.clone().requires_grad_(True)
    g_delta, g_theta = torch.autograd.grad(outer_loss(call(t0), x, y, d0.view(1, 1, 2, 2), rows), [d0, t0])
    expected = g_theta - mixed.T @ torch.linalg.solve(hessian, g_delta)

    got = torch.cat([g.flatten() for g in grads])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, g_theta, atol=1e-4)  # the implicit term is there, and matters


def test_inner_maximisation_finds_the_trigger_within_the_bound(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    ibau = IBAU(IBAUConfig(norm_bound=3.0), seed=0, device=CPU)
    delta = ibau.universal_perturbation(model, data, torch.Generator().manual_seed(0))
    assert delta.shape == (1, *SPEC.image_shape) and not delta.requires_grad
    assert float(delta.norm()) <= 3.0 + 1e-5
    assert all(p.grad is None for p in model.parameters())  # the inner steps leave the model alone
    x, y = data.val.images.float() / 255, data.val.labels
    with torch.no_grad():
        clean, perturbed = model(x), model((x + delta).clamp(0, 1))
    assert float(F.cross_entropy(perturbed, y)) > float(F.cross_entropy(clean, y)) + 1.0
    # on the backdoored model the worst universal perturbation is the backdoor: it sends the
    # other classes to the target
    assert float((perturbed[y != TARGET].argmax(1) == TARGET).float().mean()) > 0.5


def test_removes_the_planted_backdoor_and_keeps_the_running_statistics(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    original, data = backdoored
    asr_before, ba_before = scores(original)
    assert asr_before > 0.9 and ba_before > 0.95
    model = copy.deepcopy(original)
    result = IBAU(IBAUConfig(**TOY), seed=0, device=CPU).purify(model, data)
    asr, ba = scores(result.model)
    assert asr < asr_before - 0.5, (asr_before, asr)
    assert ba > 0.8, ba
    diag = result.diagnostics
    assert len(diag["perturbation_norms"]) == len(diag["outer_losses"]) == 5
    assert max(diag["perturbation_norms"]) <= 10.0 + 1e-4
    assert diag["perturbed_val_accuracy"][0] < 0.5  # the first round's δ fools the backdoored model
    # eval mode throughout: BatchNorm statistics are those of the backdoored model
    for bn, bn0 in zip(result.model.batchnorms(), original.batchnorms(), strict=True):
        assert torch.equal(torch.as_tensor(bn.running_mean), torch.as_tensor(bn0.running_mean))

    # the control: no perturbation, so the same Adam steps on clean batches only
    control = IBAU(IBAUConfig(**TOY, norm_bound=0.0), seed=0, device=CPU).purify(
        copy.deepcopy(original), data
    )
    assert scores(control.model)[0] > asr + 0.5


def test_same_seed_same_model(backdoored: tuple[ImageClassifier, DefenseData]) -> None:
    original, data = backdoored
    config = IBAUConfig(rounds=1, fixed_point_steps=2)
    a = IBAU(config, seed=3, device=CPU).purify(copy.deepcopy(original), data).model
    b = IBAU(config, seed=3, device=CPU).purify(copy.deepcopy(original), data).model
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.fc.weight, original.fc.weight)


def test_registered_by_name() -> None:
    assert get_purifier("i-bau") is IBAU
    assert IBAU.meta.requires == ()
