"""SAU: its losses by hand, the PGD's box and side effects, and a planted backdoor it removes.

The backdoor test plants a blended trigger (amplitude 0.1 over the whole image) in a small-cnn
trained on a four-class toy; SAU runs with ε scaled to that trigger (0.1 instead of the paper's
0.2 on CIFAR images) and a larger learning rate for its few steps. A control run with the same
settings but no shared-adversarial term (so: clean training with the same optimiser) keeps the
backdoor, so the drop is SAU's doing and not that of training on clean data.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bdtk_baselines.sau import (
    PAPER_RECIPE,
    SAU,
    SAUConfig,
    SharedPGD,
    js_divergence,
    log_one_minus_prob,
    shared_adversarial_risk,
)
from torch import Tensor

from backdoor_toolkit import (
    DataSpec,
    DefenseData,
    ImageClassifier,
    ImageData,
    TrainingSettings,
    get_purifier,
    resolve_config,
    train_classifier,
)
from backdoor_toolkit.models.small_cnn import SmallCNN

SPEC = DataSpec("sau-toy", 4, 1, 16, 16, (0.5,), (0.5,), hflip=False)
TARGET = 0
CPU = torch.device("cpu")
SQUARES = [(1, 1), (1, 7), (7, 1), (7, 7)]  # class c: a bright 5×5 square at SQUARES[c]
PATTERN = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
# settings for the toy (see the module docstring); λs, PGD steps and start are the defaults
TOY = {"epochs": 6, "batch_size": 32, "lr": 7e-4, "eps": 0.1, "pgd_step_size": 0.1}

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = torch.rand(n, 1, 16, 16, generator=gen) * 0.15
    for c, (r, col) in enumerate(SQUARES):
        x[labels == c, :, r : r + 5, col : col + 5] += 0.5
    return x, labels


def _trigger(x: Tensor) -> Tensor:
    return (x + 0.1 * PATTERN).clamp(0, 1)


def _u8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _scores(model: torch.nn.Module) -> tuple[float, float]:
    """(ASR on non-target test images, clean accuracy) on 400 fresh toy images."""
    x, y = _images(400, 7)
    victims = y != TARGET
    with torch.no_grad():
        ba = float((model(_u8(x).float() / 255).argmax(1) == y).float().mean())
        triggered = _u8(_trigger(x[victims])).float() / 255
        asr = float((model(triggered).argmax(1) == TARGET).float().mean())
    return asr, ba


@pytest.fixture(scope="module")
def backdoored(one_thread: None) -> tuple[ImageClassifier, DefenseData]:
    """A small-cnn with a blended backdoor (10% poisoning), and a clean budget of 96 + 32 images."""
    torch.manual_seed(0)
    x, y = _images(384, 0)
    poison = torch.arange(384) % 10 == 3
    x[poison], y[poison] = _trigger(x[poison]), TARGET
    model = SmallCNN(1, 4, (0.5,), (0.5,), width=16)
    train_classifier(model, _u8(x), y, TrainingSettings(5, 32, 0.05, 5e-4, False, False, CPU), seed=0)
    (xt, yt), (xv, yv) = _images(96, 1), _images(32, 2)
    data = DefenseData(
        SPEC, ImageData(_u8(xt), yt), ImageData(_u8(xv), yv), torch.arange(96), torch.arange(96, 128)
    )
    return model.eval(), data


def test_registered_without_model_requirements() -> None:
    assert get_purifier("sau") is SAU
    assert SAU.meta.requires == ()  # forward and backward passes only: any ImageClassifier


def test_js_divergence_by_hand() -> None:
    a = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(js_divergence(a, a), torch.zeros(2), atol=1e-7)
    # disjoint one-hot distributions are log 2 apart; JS is symmetric
    p, q = torch.tensor([[60.0, 0.0]]), torch.tensor([[0.0, 60.0]])
    assert torch.allclose(js_divergence(p, q), torch.tensor([math.log(2.0)]), atol=1e-6)
    b = torch.randn(5, 4)
    c = torch.randn(5, 4)
    assert torch.allclose(js_divergence(b, c), js_divergence(c, b), atol=1e-6)
    pb, pc = b.softmax(1), c.softmax(1)
    m = (pb + pc) / 2
    by_hand = 0.5 * (pb * (pb / m).log()).sum(1) + 0.5 * (pc * (pc / m).log()).sum(1)
    assert torch.allclose(js_divergence(b, c), by_hand, atol=1e-6)


def test_log_one_minus_prob_is_exact_and_stays_finite() -> None:
    logits = torch.randn(6, 5)
    classes = torch.tensor([0, 1, 2, 3, 4, 0])
    expected = torch.log(1 - logits.softmax(1).gather(1, classes.view(-1, 1)).squeeze(1))
    assert torch.allclose(log_one_minus_prob(logits, classes), expected, atol=1e-6)
    # p_c = 1 − e^{-100} is 1.0 in float: log(1 − p) would be −inf, the exact value is −100
    sure = log_one_minus_prob(torch.tensor([[100.0, 0.0]]), torch.tensor([0]))
    assert torch.allclose(sure, torch.tensor([-100.0]))


def test_shared_adversarial_risk_counts_only_examples_that_fool_the_reference() -> None:
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    assert shared_adversarial_risk(logits, labels, torch.zeros(3, dtype=torch.bool)) == 0
    fooled = torch.tensor([True, False, True])
    risk = shared_adversarial_risk(logits, labels, fooled)
    by_hand = -(math.log(1 - torch.softmax(logits[0], 0)[0].item()) + math.log(0.5)) / 3  # over the batch
    assert math.isclose(float(risk), by_hand, rel_tol=1e-5)


@pytest.mark.parametrize("init", ["max", "random"])
def test_pgd_stays_in_the_box_and_touches_no_model(
    backdoored: tuple[ImageClassifier, DefenseData], init: str
) -> None:
    model, data = backdoored
    model, reference = copy.deepcopy(model), copy.deepcopy(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    config = SAUConfig(eps=0.05, pgd_step_size=0.03, pgd_init=init, clip=True)  # type: ignore[arg-type]
    pgd = SharedPGD(model, reference, config)
    x, y = data.train.float_images()[:32], data.train.labels[:32]
    delta = pgd.attack(x, y, torch.Generator().manual_seed(0))
    assert delta.shape == x.shape and float(delta.abs().max()) <= 0.05 + 1e-7
    assert float(delta.abs().max()) > 0.02  # it moved
    perturbed = pgd.perturb(x, delta)
    assert float(perturbed.min()) >= 0 and float(perturbed.max()) <= 1
    assert all(p.grad is None for p in [*model.parameters(), *reference.parameters()])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert 1 <= pgd.stats["pgd_steps"] <= config.pgd_steps


def test_pgd_finds_the_backdoor_as_the_shared_adversarial_example(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    # before any unlearning the two models are one, so an adversarial example is a shared one;
    # within ε = the trigger's amplitude, the easiest way to fool the backdoored model is its target
    model, data = backdoored
    keep = data.train.labels != TARGET
    x, y = data.train.float_images()[keep], data.train.labels[keep]
    config = SAUConfig(eps=0.1, pgd_step_size=0.05, pgd_steps=3, pgd_init="zero")
    pgd = SharedPGD(copy.deepcopy(model), copy.deepcopy(model), config)
    delta = pgd.attack(x, y, torch.Generator())
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).float().mean()) == 1.0
        predicted = model(pgd.perturb(x, delta)).argmax(1)
    assert float((predicted == TARGET).float().mean()) >= 0.9


def test_sau_removes_a_planted_backdoor_that_clean_training_keeps(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = backdoored
    asr_before, ba_before = _scores(model)
    assert asr_before >= 0.9 and ba_before >= 0.95

    purified = copy.deepcopy(model)
    result = SAU(SAUConfig.model_validate(TOY), seed=0).purify(purified, data)
    asr_after, ba_after = _scores(purified)
    assert result.model is purified and result.modified
    assert asr_after < asr_before - 0.5
    assert ba_after >= 0.9
    diag = result.diagnostics
    assert diag["val_accuracy_after"] >= 0.9
    assert diag["shared_rate"][0] >= 0.5  # the backdoored model starts with many shared examples
    assert len(diag["epoch_losses"]) == TOY["epochs"] and all(map(math.isfinite, diag["epoch_losses"]))

    # the control: λ_sar = 0 (and λ_at = 0) is clean training with the same optimiser, in which
    # the perturbations play no part, so one PGD step is enough to make it cheap
    control = copy.deepcopy(model)
    SAU(SAUConfig.model_validate({**TOY, "lambda_sar": 0.0, "pgd_steps": 1}), seed=0).purify(control, data)
    asr_control, _ = _scores(control)
    assert asr_control > asr_after + 0.5


def test_seeded_runs_repeat_and_leave_batchnorm_statistics_alone(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = backdoored
    config = SAUConfig(epochs=1, batch_size=32, lr=1e-3, pgd_steps=2, pgd_init="random", augment=True)
    runs = []
    for _ in range(2):
        purified = copy.deepcopy(model)
        SAU(config, seed=3, device=CPU).purify(purified, data)
        runs.append(purified.state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    assert not torch.equal(runs[0]["fc.weight"], model.state_dict()["fc.weight"])
    # in eval mode (the default) the running statistics are the backdoored model's
    stats = [k for k in runs[0] if "running_" in k]
    assert stats and all(torch.equal(runs[0][k], model.state_dict()[k]) for k in stats)
    trained = copy.deepcopy(model)
    SAU(config.model_copy(update={"batchnorm_train": True}), seed=3).purify(trained, data)
    assert not all(torch.equal(trained.state_dict()[k], model.state_dict()[k]) for k in stats)


def test_defaults_are_the_paper_recipe_and_short_only_shortens_it() -> None:
    assert SAUConfig().model_dump() == PAPER_RECIPE
    short = resolve_config("purifier", "sau:short")
    assert short.model_dump() == {**PAPER_RECIPE, "epochs": 20}
