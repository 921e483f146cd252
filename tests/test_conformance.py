"""The conformance kit: every registered plugin passes it, and it catches each broken rule.

Checks run on a tiny model; a plugin makes itself fast for them with a `conformance_config`
class attribute. `FAST` below gives small settings to built-in plugins that do not define one yet
(a plugin's own attribute wins).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import pytest
import torch
from pydantic import Field
from torch import Tensor

from backdoor_toolkit import (
    Attack,
    AttackConfig,
    DefenseData,
    ImageClassifier,
    InversionResult,
    PluginMeta,
    PurificationResult,
    Purifier,
    StrictConfig,
    TriggerInverter,
)
from backdoor_toolkit.plugins import get_registry
from backdoor_toolkit.testing import (
    ConformanceError,
    check_attack,
    check_config,
    check_inverter,
    check_plugin,
    check_purifier,
)

FAST: dict[str, dict[str, Any]] = {
    "trojan": {"steps": 3},
    "anp": {"iterations": 5},
    "nad": {"epochs": 1, "teacher_epochs": 1},
    "finetune": {"epochs": 1},
    "fine-pruning": {"epochs": 1, "step": 0.25},
    "input-aware": {"mask_epochs": 0, "width": 4},
    "mcldef": {  # purify even when nothing is flagged, so the contrastive stage runs too
        "inverter_config": {"steps": 5, "batch_size": 8, "eval_images": 16},
        "epochs": 1,
        "on_no_detection": "top-ranked",
        "min_attack_success": 0.0,
        "min_mask_l1": 0.0,
    },
}

PLUGINS = get_registry().all()


@pytest.mark.parametrize("info", PLUGINS, ids=[f"{info.kind}:{info.name}" for info in PLUGINS])
def test_every_registered_plugin_conforms(info: Any, bdtk_device: torch.device) -> None:
    config = None if hasattr(info.cls, "conformance_config") else FAST.get(info.name)
    check_plugin(info.cls, config=config, device=bdtk_device)


def test_registry_is_not_empty_and_holds_the_example() -> None:
    assert {"attack", "purifier"} <= {info.kind for info in PLUGINS}
    assert "clp" in {info.name for info in PLUGINS}


# --- the kit catches what it promises to catch -------------------------------------------------


class _Cfg(StrictConfig):
    steps: int = Field(default=3, ge=1, le=100, description="Steps")


class _Meta:
    meta = PluginMeta(summary="test plugin")


class GoodPurifier(Purifier):
    name = "good-purifier"
    Config = _Cfg
    meta = _Meta.meta

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        return PurificationResult(model=model, modified=False, diagnostics={"steps": 3})


def test_a_correct_purifier_passes() -> None:
    result = check_purifier(GoodPurifier)
    assert result.diagnostics == {"steps": 3}


def test_purifier_that_mutates_the_defense_data_fails() -> None:
    class Mutating(GoodPurifier):
        def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
            data.train.labels[0] = (data.train.labels[0] + 1) % 4
            return super().purify(model, data)

    with pytest.raises(ConformanceError, match=r"changed the defense data: train\.labels"):
        check_purifier(Mutating)


def test_purifier_that_leaves_the_device_fails() -> None:
    class Moving(GoodPurifier):
        def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
            return PurificationResult(model=model.to("meta"), modified=True)

    with pytest.raises(ConformanceError, match="must stay on cpu"):
        check_purifier(Moving)


def test_unmodified_claim_is_checked() -> None:
    class Liar(GoodPurifier):
        def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
            with torch.no_grad():
                model.fc.bias.add_(1.0)
            return PurificationResult(model=model, modified=False)

    with pytest.raises(ConformanceError, match="modified=False but the model's weights changed"):
        check_purifier(Liar)


def test_non_json_diagnostics_fail() -> None:
    class Tensorish(GoodPurifier):
        def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
            return PurificationResult(model=model, modified=False, diagnostics={"mask": torch.ones(2)})

    with pytest.raises(ConformanceError, match="JSON-serialisable"):
        check_purifier(Tensorish)


def test_config_contract() -> None:
    class Loose(StrictConfig):
        steps: int = Field(default=3, description="Steps")  # no bounds

    class Undescribed(StrictConfig):
        steps: int = Field(default=3, ge=1)

    class Required(StrictConfig):
        steps: int = Field(ge=1, description="Steps")

    class LooseList(StrictConfig):
        weights: list[float] = Field(default_factory=lambda: [1.0], description="Weights")

    class LooseTuple(StrictConfig):
        pair: tuple[float, Annotated[float, Field(ge=0)]] | None = Field(default=None, description="Pair")

    class BoundList(StrictConfig):
        weights: list[Annotated[float, Field(ge=0, le=10)]] = Field(
            default_factory=lambda: [1.0], description="W"
        )

    check_config(type("P", (GoodPurifier,), {"Config": BoundList, "name": "p"}))
    for config_cls, message in (
        (Loose, "declares no bounds"),
        (LooseList, "'weights' holds numbers without bounds"),
        (LooseTuple, "'pair' holds numbers without bounds"),
        (Undescribed, "lack a description: steps"),
        (Required, "have no default: steps"),
    ):
        cls = type("P", (GoodPurifier,), {"Config": config_cls, "name": "p"})
        with pytest.raises(ConformanceError, match=message):
            check_config(cls)


def test_conformance_config_and_explicit_config_make_checks_fast() -> None:
    class Slow(GoodPurifier):
        Config = _Cfg
        conformance_config: ClassVar[dict[str, Any]] = {"steps": 1}

        def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
            assert isinstance(self.config, _Cfg)
            if self.config.steps > 1:
                raise AssertionError("ran with the slow defaults")
            return super().purify(model, data)

    check_purifier(Slow)
    with pytest.raises(AssertionError, match="slow defaults"):
        check_purifier(Slow, config={"steps": 5})


class Stamp(Attack):
    name = "stamp"
    Config = AttackConfig
    meta = PluginMeta(summary="corner pixel")

    def apply_trigger(self, images: Tensor) -> Tensor:
        out = images.clone()
        out[..., -2:, -2:] = 1.0
        return out


def test_a_correct_attack_passes() -> None:
    poisoned = check_attack(Stamp)
    assert poisoned.poisoned_index.numel() == round(0.1 * 64)


def test_attack_that_stamps_in_place_fails() -> None:
    class InPlace(Stamp):
        def apply_trigger(self, images: Tensor) -> Tensor:
            images[..., -2:, -2:] = 1.0
            return images

    with pytest.raises(ConformanceError, match="modified its input batch in place"):
        check_attack(InPlace)


def test_attack_leaving_the_unit_range_fails() -> None:
    class Bright(Stamp):
        def apply_trigger(self, images: Tensor) -> Tensor:
            return images + 2.0

    with pytest.raises(ConformanceError, match=r"leaves \[0, 1\]"):
        check_attack(Bright)


def test_attack_whose_trigger_state_is_lost_fails() -> None:
    class Random(Stamp):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.value = torch.rand(())  # drawn unseeded, and not saved by trigger_state

        def apply_trigger(self, images: Tensor) -> Tensor:
            out = images.clone()
            out[..., :2, :2] = self.value
            return out

    with pytest.raises(ConformanceError, match="trigger differs"):
        check_attack(Random)


class FlatInverter(TriggerInverter):
    name = "flat"
    Config = _Cfg
    meta = PluginMeta(summary="returns a fixed corner mask")

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        classes = list(range(data.spec.num_classes)) if classes is None else classes
        k, (c, h, w) = len(classes), data.spec.image_shape
        masks = torch.zeros(k, 1, h, w)
        masks[..., -3:, -3:] = 1
        return InversionResult(
            classes=classes,
            masks=masks,
            patterns=torch.ones(k, c, h, w),
            mask_norms=masks.flatten(1).sum(1),
            attack_success=torch.zeros(k),
            anomaly_index=torch.zeros(k),
            flagged=[],
        )


def test_a_correct_inverter_passes() -> None:
    assert check_inverter(FlatInverter).classes == [0, 1, 2, 3]


def test_inverter_that_changes_bn_statistics_fails() -> None:
    class TrainMode(FlatInverter):
        def invert(
            self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
        ) -> InversionResult:
            model.train()(torch.rand(8, *data.spec.image_shape))  # updates BN running stats
            return super().invert(model, data, classes)

    with pytest.raises(ConformanceError, match="changed the model's weights or buffers"):
        check_inverter(TrainMode)


def test_inverter_ignoring_classes_fails() -> None:
    class AllAlways(FlatInverter):
        def invert(
            self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
        ) -> InversionResult:
            return super().invert(model, data, None)

    with pytest.raises(ConformanceError, match=r"invert\(classes=\[3\]\) returned classes"):
        check_inverter(AllAlways)


def test_check_distribution_reports_what_a_user_would_meet() -> None:
    from backdoor_toolkit.testing import check_distribution

    builtins = {info.name for info in check_distribution("backdoor-toolkit")}
    assert {"badnets", "neural-cleanse", "mcldef", "finetune"} <= builtins
    with pytest.raises(ConformanceError, match="registers no plugin"):
        check_distribution("bdtk-not-installed")
