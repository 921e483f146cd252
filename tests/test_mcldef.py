"""MCLDef: the loss on hand-computed values, gradients only into the trainable model, the frozen
model untouched, and the detection / no-detection / degenerate-trigger paths, all against a
throwaway inverter registered for the test (so nothing here depends on the real Neural Cleanse)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import ClassVar, Literal

import pytest
import torch
from bdtk_mcldef import mcldef as mcldef_module
from bdtk_mcldef.loss import FrozenReference, model_contrastive_loss
from bdtk_mcldef.mcldef import DegenerateTriggerWarning, MCLDef, recalibrate_batchnorm, step_lr
from pydantic import Field

from backdoor_toolkit import (
    ConfigError,
    DefenseData,
    ImageClassifier,
    ImageData,
    InversionResult,
    PluginMeta,
    StrictConfig,
    TrainingSettings,
    TriggerInverter,
    build_config,
    create_model,
    get_purifier,
    hookimpl,
    predict,
    train_classifier,
)
from backdoor_toolkit.data import dataset_spec
from backdoor_toolkit.models.small_cnn import SmallCNN
from backdoor_toolkit.plugins import register_plugin, unregister_plugin

SPEC = dataset_spec("fashion-mnist")
TARGET = 0
CPU = torch.device("cpu")


def _patch(top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(1, 28, 28)
    mask[:, top : top + 4, left : left + 4] = 1.0
    return mask, torch.ones(1, 28, 28)


MASK, PATTERN = _patch(23, 23)  # the planted trigger: a white 4×4 square, bottom-right


def stamp(x: torch.Tensor) -> torch.Tensor:
    return (1 - MASK) * x + MASK * PATTERN


# --- a throwaway inverter ----------------------------------------------------------------------


class FakeInverterConfig(StrictConfig):
    scenario: Literal["flag-target", "flag-two", "none", "empty-mask", "weak"] = Field(
        default="flag-target", description="Which inversion outcome to return"
    )


class FakeInverter(TriggerInverter):
    """Returns the planted trigger for TARGET and large, weak triggers for the other classes."""

    name = "test-fake-inverter"
    Config = FakeInverterConfig
    config: FakeInverterConfig
    meta = PluginMeta(summary="test-only inverter")
    calls: ClassVar[list[list[int] | None]] = []

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        FakeInverter.calls.append(classes)
        classes = list(range(SPEC.num_classes)) if classes is None else classes
        k, scenario = len(classes), self.config.scenario
        masks, patterns = torch.full((k, 1, 28, 28), 0.3), torch.full((k, 1, 28, 28), 0.5)
        success = torch.full((k,), 0.2)
        flagged = [] if scenario == "none" else [TARGET]
        if TARGET in classes:
            i = classes.index(TARGET)
            masks[i], patterns[i], success[i] = MASK, PATTERN, 1.0
            if scenario == "empty-mask":
                masks[i] = 0.0
            if scenario == "weak":
                success[i] = 0.1
        if scenario == "flag-two":
            masks[1], patterns[1] = _patch(0, 0)
            success[1] = 1.0
            flagged = [TARGET, 1]
        norms = masks.flatten(1).sum(1)
        return InversionResult(
            classes=classes,
            masks=masks,
            patterns=patterns,
            mask_norms=norms,
            attack_success=success,
            anomaly_index=torch.linspace(4.0, 0.0, k),
            flagged=flagged,
        )


class _Plugin:
    @hookimpl
    def register_inverters(self, register):  # type: ignore[no-untyped-def]
        register(FakeInverter)


@pytest.fixture(autouse=True)
def fake_inverter() -> Iterator[None]:
    register_plugin(_Plugin(), "test-mcldef-fake-inverter")
    FakeInverter.calls.clear()
    yield
    unregister_plugin("test-mcldef-fake-inverter")


# --- a tiny backdoored model on synthetic data ---------------------------------------------------


def _synthetic(n: int, seed: int) -> ImageData:
    """Learnable classes: each one a fixed random blob pattern, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(SPEC.num_classes, 1, 28, 28, generator=torch.Generator().manual_seed(99))
    protos[..., 22:, 22:] = 0.2  # keep the trigger's corner uninformative
    labels = torch.arange(n) % SPEC.num_classes
    images = (0.7 * protos[labels] + 0.3 * torch.rand(n, 1, 28, 28, generator=gen)).clamp(0, 1)
    return ImageData((images * 255).round().to(torch.uint8), labels)


@pytest.fixture(scope="module")
def backdoored() -> tuple[ImageClassifier, DefenseData]:
    torch.manual_seed(0)
    train = _synthetic(320, seed=1)
    x, y = train.float_images(), train.labels.clone()
    poison = torch.randperm(320)[:64]  # 20 % of the images carry the trigger and the target label
    x[poison], y[poison] = stamp(x[poison]), TARGET
    model = SmallCNN(1, SPEC.num_classes, SPEC.mean, SPEC.std, width=8)
    settings = TrainingSettings(
        epochs=8, batch_size=32, lr=0.05, weight_decay=5e-4, augment=False, hflip=False, device=CPU
    )
    train_classifier(model, x, y, settings, seed=0)
    clean, val = _synthetic(160, seed=2), _synthetic(100, seed=3)
    data = DefenseData(SPEC, clean, val, torch.arange(160), torch.arange(160, 260))
    return model, data


def trigger_asr(model: torch.nn.Module, data: ImageData) -> float:
    victims = data.labels != TARGET
    return float((predict(model, data.images[victims], CPU, transform=stamp) == TARGET).float().mean())


def mcldef(**values: object) -> MCLDef:
    cfg = build_config(
        MCLDef.Config,
        {"inverter": "test-fake-inverter", "epochs": 3, "batch_size": 32, **values},
        "test",
    )
    return MCLDef(cfg, seed=0)


def without_val(data: DefenseData) -> DefenseData:
    """The same budget with an empty val split (val_fraction 0)."""
    empty = ImageData(data.val.images[:0], data.val.labels[:0])
    return DefenseData(data.spec, data.train, empty, data.index_train, data.index_val[:0])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the loss ----------------------------------------------------------------------------------


def test_loss_matches_hand_computed_values() -> None:
    anchor = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    positive = torch.tensor([[3.0, 0.0], [-1.0, -1.0]])  # cos = 1, −1
    negative = torch.tensor([[0.0, 2.0], [2.0, 2.0]])  # cos = 0, 1
    # τ = 0.5: logits (2, 0) and (−2, 2); −log softmax of the first
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(4))) / 2
    loss = model_contrastive_loss(anchor, positive, negative, temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # τ = 1 halves the logits
    expected_t1 = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert model_contrastive_loss(anchor, positive, negative, 1.0).item() == pytest.approx(
        expected_t1, rel=1e-6
    )


def test_loss_is_low_when_anchor_matches_positive() -> None:
    feats = torch.randn(8, 16)
    other = torch.randn(8, 16)
    good = model_contrastive_loss(feats, feats, other, 0.5)
    bad = model_contrastive_loss(other, feats, other, 0.5)
    assert good.item() < math.log(2) < bad.item()


def test_batchnorm_recalibration_takes_the_statistics_of_the_given_images_alone() -> None:
    torch.manual_seed(0)
    model = create_model("small-cnn", SPEC).eval()
    first = model.batchnorms()[0]
    bright = (torch.rand(40, 1, 28, 28) * 255).to(torch.uint8)
    seen: list[torch.Tensor] = []
    handle = first.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    with torch.no_grad():
        model(bright.float() / 255)  # eval mode: running statistics untouched
    handle.remove()
    inputs = seen[0]
    momentum = first.momentum
    recalibrate_batchnorm(model, bright, 16, torch.device("cpu"))  # three batches: 16, 16, 8
    assert not model.training and first.momentum == momentum
    # a cumulative average of per-batch means over equal-weighted batches, as BatchNorm computes it
    batch_means = [inputs[i : i + 16].mean(dim=(0, 2, 3)) for i in (0, 16, 32)]
    assert torch.allclose(first.running_mean, torch.stack(batch_means).mean(0), atol=1e-5)
    again = copy.deepcopy(model)
    recalibrate_batchnorm(again, bright, 16, torch.device("cpu"))
    assert torch.equal(again.batchnorms()[0].running_var, first.running_var)  # no memory of before


def test_distillation_term_is_the_tempered_kl_to_the_frozen_model_on_clean_images() -> None:
    torch.manual_seed(0)
    theta = create_model("small-cnn", SPEC).eval()
    frozen = FrozenReference(copy.deepcopy(theta))
    clean, triggered = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    labels = torch.arange(6) % SPEC.num_classes

    def added(model: ImageClassifier) -> float:
        base = mcldef(distill_weight=0.0)._loss(model, frozen, clean, triggered, labels)
        with_kl = mcldef(distill_weight=2.0, distill_temperature=3.0)._loss(
            model, frozen, clean, triggered, labels
        )
        return float((with_kl - base).detach())

    # the trainable model still equals the frozen one: nothing to distil
    assert added(theta) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        theta.fc.weight.add_(0.5 * torch.randn_like(theta.fc.weight))
        teacher = torch.softmax(frozen.model(clean) / 3.0, 1)
        student = torch.log_softmax(theta(clean) / 3.0, 1)
        kl = float((teacher * (teacher.log() - student)).sum(1).mean())
    assert kl > 1e-3
    assert added(theta) == pytest.approx(2.0 * 9.0 * kl, rel=1e-4)


def test_gradients_flow_only_into_the_trainable_model() -> None:
    torch.manual_seed(0)
    theta = create_model("small-cnn", SPEC)
    frozen = FrozenReference(copy.deepcopy(theta))
    frozen.train()  # must stay in eval mode
    assert not frozen.model.training
    x = torch.rand(4, 1, 28, 28)
    xt = stamp(x)
    positive, negative = frozen.positives_and_negatives(x, xt)
    assert not positive.requires_grad and not negative.requires_grad
    theta.train()
    loss = model_contrastive_loss(theta.features(xt), positive, negative, 0.5)
    loss.backward()
    convs = [p for p in theta.groups.parameters() if p.dim() == 4]  # the head is not in the features
    assert convs and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in convs)
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("ce_on", ["clean", "clean+triggered"])
def test_cross_entropy_term_is_added_on_the_chosen_inputs(ce_on: str) -> None:
    torch.manual_seed(0)
    model = create_model("small-cnn", SPEC).eval()  # eval: one batch or two give the same features
    frozen = FrozenReference(copy.deepcopy(model))
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    triggered = stamp(x)

    def loss(**values: object) -> float:
        return float(mcldef(**values)._loss(model, frozen, x, triggered, y).detach())

    contrastive = loss(ce_weight=0.0, ce_on="clean")
    with torch.no_grad():
        ce_clean = float(torch.nn.functional.cross_entropy(model(x), y))
        ce_triggered = float(torch.nn.functional.cross_entropy(model(triggered), y))
    ce = ce_clean if ce_on == "clean" else (ce_clean + ce_triggered) / 2  # triggered keep true labels
    assert loss(ce_weight=2.0, ce_on=ce_on) == pytest.approx(contrastive + 2.0 * ce, rel=1e-5)


def test_cross_entropy_on_triggered_inputs_without_a_weight_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ce_weight > 0"):
        build_config(MCLDef.Config, {"ce_on": "clean+triggered", "ce_weight": 0.0}, "mcldef")


def test_step_schedule_scales_the_authors_epochs() -> None:
    assert [step_lr(e, 20, 0.1) for e in range(20)] == pytest.approx([0.1] + [0.01] * 9 + [0.001] * 10)
    assert [step_lr(e, 40, 0.1) for e in (0, 1, 2, 19, 20, 39)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    assert [step_lr(e, 2, 0.1) for e in (0, 1)] == pytest.approx([0.1, 0.001])


def test_warmup_ramps_the_first_steps_and_clipping_bounds_every_gradient(
    backdoored: tuple[ImageClassifier, DefenseData], monkeypatch: pytest.MonkeyPatch
) -> None:
    lrs: list[float] = []
    norms: list[float] = []
    set_lr, sgd_step = mcldef_module._Step.set_lr, torch.optim.SGD.step

    def recording_set_lr(self: mcldef_module._Step, lr: float) -> None:
        lrs.append(lr)
        set_lr(self, lr)

    def recording_step(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return sgd_step(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mcldef_module._Step, "set_lr", recording_set_lr)
    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    mcldef(warmup_steps=4, max_grad_norm=0.5, early_stop=False, lr=0.01).purify(model, data)
    steps_per_epoch = math.ceil(len(data.train) / 32)
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[4:steps_per_epoch] == pytest.approx([0.01] * (steps_per_epoch - 4))
    assert lrs[steps_per_epoch:] == pytest.approx([step_lr(1, 3, 0.01)] * (len(lrs) - steps_per_epoch))
    assert len(norms) == len(lrs) == 3 * steps_per_epoch and max(norms) <= 0.5 + 1e-5
    norms.clear()
    mcldef(early_stop=False, lr=0.01).purify(copy.deepcopy(backdoored[0]), data)
    assert max(norms) > 0.5  # without clipping the same run takes larger steps: the bound did something


@pytest.mark.parametrize("stamp_mode", ["after-augment", "before-augment"])
def test_trigger_stamped_before_augmenting_moves_with_the_image(stamp_mode: str) -> None:
    """A full-image trigger on grey images: only a shared crop puts padding at the same pixels."""
    purifier = MCLDef(MCLDef.Config(stamp=stamp_mode), seed=0, device=CPU)  # type: ignore[arg-type]
    x = torch.full((64, 1, 28, 28), 0.5)
    masks, patterns = torch.ones(1, 1, 28, 28), torch.full((1, 1, 28, 28), 0.9)
    clean, triggered = purifier._pairs(x, masks, patterns, hflip=True, gen=torch.Generator().manual_seed(0))
    padding = clean == 0
    assert bool(padding.any())  # some images were shifted
    if stamp_mode == "before-augment":
        assert torch.equal(triggered == 0, padding)
        assert torch.allclose(triggered[~padding], torch.tensor(0.9))
    else:
        assert torch.allclose(triggered, torch.tensor(0.9))  # stamped over the padding too


# --- purification --------------------------------------------------------------------------------


def test_registered_under_its_name() -> None:
    assert get_purifier("mcldef") is MCLDef


def test_purifies_the_planted_backdoor_and_leaves_the_frozen_copy_alone(
    backdoored: tuple[ImageClassifier, DefenseData], monkeypatch: pytest.MonkeyPatch
) -> None:
    original, data = backdoored
    model = copy.deepcopy(original)
    assert trigger_asr(model, data.val) > 0.8
    clean_before = float((predict(model, data.val.images, CPU) == data.val.labels).float().mean())
    frozen_seen: list[FrozenReference] = []
    forward_calls = [0]

    class Recording(FrozenReference):
        def __init__(self, m: ImageClassifier) -> None:
            super().__init__(m)
            frozen_seen.append(self)
            m.final.register_forward_hook(lambda *_: forward_calls.__setitem__(0, forward_calls[0] + 1))

    monkeypatch.setattr(mcldef_module, "FrozenReference", Recording)
    # τ = 0.1: on this toy model clean and triggered features start at cosine ≈ 0.95 (see docs)
    result = mcldef(epochs=6, temperature=0.1, early_stop=False).purify(model, data)

    assert result.modified and result.detected is True
    assert result.diagnostics["purified_targets"] == [TARGET]
    assert set(result.stage_seconds) == {"inversion", "purification"}
    assert len(result.diagnostics["epoch_losses"]) == 6
    assert trigger_asr(result.model, data.val) < 0.4
    clean_after = float((predict(result.model, data.val.images, CPU) == data.val.labels).float().mean())
    assert clean_after >= clean_before - 0.05
    # the frozen copy is the backdoored model as it was, seen once per batch (clean + triggered)
    (frozen,) = frozen_seen
    assert same_weights(frozen.model, original)
    assert not frozen.model.training
    assert forward_calls[0] == 6 * math.ceil(len(data.train) / 32)
    assert not same_weights(result.model, original)


def test_known_target_inverts_only_that_class(backdoored: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    result = mcldef(target=TARGET, epochs=1, ce_weight=1.0).purify(model, data)
    assert FakeInverter.calls == [[TARGET]]
    assert result.modified and result.detected is None
    assert result.diagnostics["purified_targets"] == [TARGET]


def test_several_flagged_targets_are_all_purified(backdoored: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    result = mcldef(inverter_config={"scenario": "flag-two"}, epochs=1).purify(model, data)
    assert result.diagnostics["purified_targets"] == [TARGET, 1]
    assert set(result.diagnostics["val_trigger_asr_after"]) == {"0", "1"}


def test_no_detection_returns_the_model_unchanged(backdoored: tuple[ImageClassifier, DefenseData]) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    result = mcldef(inverter_config={"scenario": "none"}).purify(model, data)
    assert result.modified is False and result.detected is False
    assert "unchanged" in result.notes and "No class flagged" in result.notes
    assert same_weights(result.model, backdoored[0])
    assert "purification" not in result.stage_seconds


def test_no_detection_can_proceed_with_the_top_ranked_class(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    result = mcldef(inverter_config={"scenario": "none"}, on_no_detection="top-ranked", epochs=1).purify(
        model, data
    )
    assert result.modified and result.detected is False
    assert result.diagnostics["purified_targets"] == [TARGET]


@pytest.mark.parametrize(("scenario", "reason"), [("empty-mask", "mask L1"), ("weak", "attack success")])
def test_degenerate_trigger_is_reported_and_not_used(
    backdoored: tuple[ImageClassifier, DefenseData], scenario: str, reason: str
) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    with pytest.warns(DegenerateTriggerWarning, match="DEGENERATE"):
        result = mcldef(inverter_config={"scenario": scenario}).purify(model, data)
    assert result.modified is False and result.detected is True
    assert "DEGENERATE" in result.notes and reason in result.notes
    assert result.diagnostics["degenerate"][0]["class"] == TARGET
    assert same_weights(result.model, backdoored[0])


def test_bad_inverter_config_and_target_get_clear_errors(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    with pytest.raises(ConfigError, match="scenaro"):
        mcldef(inverter_config={"scenaro": "none"}).purify(model, data)
    with pytest.raises(ConfigError, match="outside the 10 classes"):
        mcldef(target=10).purify(model, data)


def test_early_stop_ends_when_val_trigger_success_and_accuracy_settle(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    cfg = {"epochs": 30, "temperature": 0.1, "early_stop_asr": 0.2, "early_stop_patience": 2}
    result = mcldef(**cfg).purify(model, data)
    d = result.diagnostics
    runs = d["epochs_run"]
    assert d["stopped_early"] and runs < 30 and len(d["epoch_losses"]) == runs
    assert len(d["val_accuracy_by_epoch"]) == len(d["val_trigger_asr_by_epoch"]) == runs
    # the rule held at the stopping epoch and not before it
    acc, asr = d["val_accuracy_by_epoch"], d["val_trigger_asr_by_epoch"]

    def rule(e: int) -> bool:
        return e >= 2 and asr[e] <= 0.2 and max(acc[e - 1 : e + 1]) <= max(acc[: e - 1]) + 0.005

    assert rule(runs - 1) and not any(rule(e) for e in range(runs - 1))
    assert "stopped early" in result.notes
    assert trigger_asr(result.model, data.val) <= 0.2


def test_best_val_selection_returns_the_best_epoch_whose_triggers_are_removed(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    cfg = {"epochs": 6, "early_stop": False, "select_epoch": "best-val", "early_stop_asr": 0.3}
    d = mcldef(**cfg).purify(model, data).diagnostics
    acc, asr = d["val_accuracy_by_epoch"], d["val_trigger_asr_by_epoch"]
    removed = [e for e in range(6) if asr[e] <= 0.3]
    assert removed, "the toy purification should remove the trigger in some epoch"
    best = max(removed, key=lambda e: (acc[e], -e))  # the first of the best
    assert d["selected_epoch"] == best + 1
    assert d["val_accuracy_after"] == pytest.approx(acc[best], abs=1e-6)
    assert d["val_trigger_asr_after"]["0"] <= 0.3
    # the same run returning its last epoch reads the last epoch's numbers
    last = mcldef(**{**cfg, "select_epoch": "last"}).purify(copy.deepcopy(backdoored[0]), data).diagnostics
    assert last["val_accuracy_by_epoch"] == acc
    assert last["val_accuracy_after"] == pytest.approx(acc[-1], abs=1e-6)
    assert "selected_epoch" not in last


def test_best_val_selection_without_a_val_split_is_a_clear_error(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    no_val = without_val(data)
    with pytest.raises(ConfigError, match="select_epoch=last"):
        mcldef(epochs=2, early_stop=False, select_epoch="best-val").purify(model, no_val)


def test_early_stop_that_can_never_trigger_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="can never trigger"):
        build_config(MCLDef.Config, {"epochs": 3, "early_stop_patience": 3}, "mcldef")
    # lowering epochs alone is fine: all epochs then run
    assert build_config(MCLDef.Config, {"epochs": 2}, "mcldef").early_stop


def test_early_stop_without_a_val_split_is_a_clear_error(
    backdoored: tuple[ImageClassifier, DefenseData],
) -> None:
    model, data = copy.deepcopy(backdoored[0]), backdoored[1]
    no_val = without_val(data)
    with pytest.raises(ConfigError, match="early_stop=false"):
        mcldef(epochs=4).purify(model, no_val)
    result = mcldef(epochs=2, early_stop=False).purify(copy.deepcopy(backdoored[0]), no_val)
    assert result.diagnostics["epochs_run"] == 2


def test_paper_preset_is_the_authors_recipe() -> None:
    from backdoor_toolkit import resolve_config

    paper = resolve_config("purifier", "mcldef:paper")
    assert isinstance(paper, MCLDef.Config)
    assert (paper.lr, paper.epochs, paper.ce_weight, paper.stamp, paper.early_stop) == (
        0.1,
        20,
        0.0,
        "after-augment",
        False,
    )
    assert paper.inverter == "neural-cleanse" and paper.inverter_config == {}  # the full scan
    assert (paper.distill_weight, paper.select_epoch, paper.recalibrate_bn) == (0.0, "last", False)
    default = resolve_config("purifier", "mcldef")
    assert isinstance(default, MCLDef.Config)
    assert default != paper and default.early_stop
    assert (default.ce_weight, default.ce_on, default.stamp) == (1.0, "clean+triggered", "before-augment")
    inverter = resolve_config("inverter", default.inverter)
    assert getattr(inverter, "schedule", None) == "k-arm"
