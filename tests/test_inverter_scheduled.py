"""Neural Cleanse's scheduled scan (`schedule="k-arm"`) on the hand-built linear toy models.

The toy of test_inverter_neural_cleanse has a one-pixel backdoor into class 2. Here the target
also gets a small bias, so clean images often rank it second and the pre-screen names it (a
backdoored model behaves like that); `scales` make the classes unequally hard, so their trigger
norms spread as real models' do and the anomaly index has a population to measure against.
"""

from __future__ import annotations

import json

import pytest
import torch
from bdtk_inverters.neural_cleanse import NeuralCleanse, NeuralCleanseConfig
from pydantic import ValidationError
from test_inverter_neural_cleanse import TARGET, _data
from test_inverter_neural_cleanse import _model as _plain_model
from torch import nn

from backdoor_toolkit import ConfigError, InversionResult, build_config

#: Unequal class difficulties: each class's block weights are multiplied by its factor.
SCALES = [1.0, 1.3, 0.8, 1.15, 0.9, 1.05]


def _model(bias: float = 0.5, backdoor: bool = True, scales: list[float] | None = None) -> nn.Module:
    model = _plain_model()
    linear = model[1]
    with torch.no_grad():
        linear.bias[TARGET] = bias
        if not backdoor:
            linear.weight[TARGET, 41] = 0.0
        if scales is not None:
            linear.weight.mul_(torch.tensor(scales).unsqueeze(1))
    return model


def _inverter(**values: object) -> NeuralCleanse:
    base: dict[str, object] = {"steps": 200, "batch_size": 16, "schedule": "k-arm"}
    return NeuralCleanse(NeuralCleanseConfig.model_validate({**base, **values}), seed=3)


def _pair(model: nn.Module, **values: object) -> tuple[InversionResult, InversionResult]:
    """The full scan and the scheduled scan of the same problem."""
    full = _inverter(schedule="full", **values).invert(model, _data())
    return full, _inverter(**values).invert(model, _data())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(one_thread: None) -> tuple[InversionResult, InversionResult]:
    return _pair(_model())


def test_full_scan_numbers_are_those_recorded_before_scheduling_existed() -> None:
    """Norms and steps of the plain toy's full scan as the pre-scheduling loop computed them."""
    r = NeuralCleanse(NeuralCleanseConfig(steps=120, batch_size=16, early_stop_patience=2), seed=3).invert(
        _plain_model(), _data()
    )
    recorded = [4.698963642120361, 4.897595405578613, 0.2187485694885254, 3.906102657318115, 4.43410062789917]
    assert torch.allclose(r.mask_norms[:5].double(), torch.tensor(recorded, dtype=torch.float64), atol=1e-4)
    assert abs(float(r.mask_norms[5]) - 4.419965744018555) < 1e-4
    assert r.diagnostics["steps"] == [120, 110, 120, 115, 120, 115]
    assert r.diagnostics["schedule_used"] == "full" and r.diagnostics["dropped"] == {}
    assert r.diagnostics["class_steps"] == 700 and r.diagnostics["full_scan_class_steps_bound"] == 720


def test_scheduled_scan_flags_the_target_with_fewer_class_steps(
    planted: tuple[InversionResult, InversionResult],
) -> None:
    full, sched = planted
    d = sched.diagnostics
    assert d["schedule_used"] == "k-arm"
    assert TARGET in d["candidates"]
    assert sched.flagged == full.flagged == [TARGET]
    assert d["class_steps"] < full.diagnostics["class_steps"] <= d["full_scan_class_steps_bound"]
    assert d["class_steps"] == sum(d["steps"]) and d["full_scan_class_steps_bound"] == 6 * 200
    assert TARGET not in d["dropped"] and d["dropped"]
    # a dropped class is never flagged; what the MAD test said before that rule is kept
    assert not set(sched.flagged) & set(d["dropped"])
    assert set(sched.flagged) <= set(d.get("flagged_before_drops", sched.flagged))
    assert all(steps >= 50 for steps in d["dropped"].values())  # nobody is dropped in the warm-up
    i = sched.classes.index(TARGET)
    assert torch.allclose(sched.masks[i], full.masks[i], atol=1e-5)  # it ran its whole course
    assert float(sched.attack_success[i]) >= 0.95
    json.dumps(d)


def test_a_target_the_prescreen_misses_is_still_found() -> None:
    """With unequal classes the pre-screen names classes 1 and 3, not the target; the target's
    norm is within drop_ratio of the smallest after the warm-up, so it stays alive and wins."""
    full, sched = _pair(_model(scales=SCALES))
    assert sched.diagnostics["schedule_used"] == "k-arm"
    assert TARGET not in sched.diagnostics["candidates"]
    assert sched.flagged == full.flagged == [TARGET]
    assert sched.diagnostics["class_steps"] < full.diagnostics["class_steps"]


def test_each_class_follows_its_full_scan_prefix(planted: tuple[InversionResult, InversionResult]) -> None:
    """A class that took s steps in the scheduled scan holds what the full scan held after s."""
    _, sched = planted
    model = _model()
    for i, cls in enumerate(sched.classes):
        steps = sched.diagnostics["steps"][i]
        alone = _inverter(schedule="full", steps=steps).invert(model, _data(), classes=[cls])
        assert alone.diagnostics["steps"] == [steps]
        assert torch.allclose(alone.masks[0], sched.masks[i], atol=1e-5), cls
        assert torch.allclose(alone.patterns[0], sched.patterns[i], atol=1e-5), cls


def test_clean_model_flags_nothing() -> None:
    full, sched = _pair(_model(bias=0.0, backdoor=False, scales=SCALES))
    d = sched.diagnostics
    # the bandit ran and dropped classes, but its top index was not decisive: the dropped classes
    # were run to their end, so the result is the full scan's, class by class
    assert d["schedule_used"] == "k-arm, completed (not decisive)"
    assert d["dropped_then_completed"] and d["dropped"] == {}
    assert d["k_arm_top_index"] < 3.0
    assert full.flagged == [] and sched.flagged == []
    assert torch.equal(sched.masks, full.masks) and torch.equal(sched.patterns, full.patterns)
    assert d["steps"] == full.diagnostics["steps"]


def test_an_undecisive_bandit_ends_as_the_full_scan_and_a_decisive_one_alone() -> None:
    """The dropped classes' norms are upper bounds, which widen the anomaly statistics and lower the
    top index; so only an index of at least `decisive_index` is decided without them."""
    model = _model()
    full = _inverter(schedule="full").invert(model, _data())
    completed = _inverter(decisive_index=100.0).invert(model, _data())
    alone = _inverter(decisive_index=0.1).invert(model, _data())
    assert completed.diagnostics["schedule_used"] == "k-arm, completed (not decisive)"
    assert torch.equal(completed.masks, full.masks) and completed.flagged == full.flagged
    assert torch.equal(completed.anomaly_index, full.anomaly_index)
    assert completed.diagnostics["class_steps"] == full.diagnostics["class_steps"]
    assert alone.diagnostics["schedule_used"] == "k-arm" and alone.diagnostics["dropped"]
    assert alone.diagnostics["class_steps"] < full.diagnostics["class_steps"]
    assert alone.flagged == full.flagged == [TARGET]


def test_ambiguous_prescreen_falls_back_to_the_full_scan() -> None:
    """On the plain toy no class is a runner-up much more often than the others."""
    full, sched = _pair(_plain_model())
    d = sched.diagnostics
    assert d["schedule_used"] == "full (pre-screen ambiguous)" and d["candidates"] == []
    assert len(d["prescreen_scores"]) == 6 and d["prescreen_top_k"] == 2
    assert torch.equal(sched.masks, full.masks) and torch.equal(sched.patterns, full.patterns)
    assert sched.flagged == full.flagged and d["class_steps"] == full.diagnostics["class_steps"]


def test_reruns_are_bit_identical() -> None:
    a = _inverter(epsilon=0.6).invert(_model(scales=SCALES), _data())
    b = _inverter(epsilon=0.6).invert(_model(scales=SCALES), _data())
    assert torch.equal(a.masks, b.masks) and torch.equal(a.patterns, b.patterns)
    assert a.diagnostics == b.diagnostics and a.flagged == b.flagged


def test_per_class_loop_follows_the_same_schedule(planted: tuple[InversionResult, InversionResult]) -> None:
    _, sched = planted
    loop = _inverter(batched=False).invert(_model(), _data())
    assert torch.allclose(loop.masks, sched.masks, atol=1e-4)
    for key in ("steps", "dropped", "candidates", "schedule_used"):
        assert loop.diagnostics[key] == sched.diagnostics[key]
    assert loop.flagged == sched.flagged


def test_the_schedule_does_not_apply_to_given_classes() -> None:
    r = _inverter(target=TARGET, steps=60).invert(_model(), _data())
    assert r.diagnostics["schedule_used"] == "full (known target)" and r.flagged == [TARGET]
    r = _inverter(steps=60).invert(_model(), _data(), classes=[0, TARGET])
    assert r.diagnostics["schedule_used"] == "full (classes given)"
    assert r.diagnostics["dropped"] == {} and r.diagnostics["candidates"] is None


def test_prescreen_top_k_rule() -> None:
    """K-Arm's rule (2 up to 8 classes, else round(0.25·K)), at most K − 2 so scores can differ."""
    nc = _inverter()
    assert [nc._top_k(k) for k in (2, 3, 6, 8, 10, 43, 100)] == [1, 1, 2, 2, 2, 11, 25]
    assert _inverter(prescreen_top_k=5)._top_k(6) == 4


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match="warmup_steps \\(200\\) below steps \\(200\\)"):
        NeuralCleanseConfig(schedule="k-arm", steps=200, warmup_steps=200)
    with pytest.raises(ConfigError, match="multiple of round_steps"):
        build_config(NeuralCleanseConfig, {"schedule": "k-arm", "warmup_steps": 52}, "neural-cleanse")
    with pytest.raises(ValidationError):
        NeuralCleanseConfig(schedule="k-arm", drop_ratio=1.0)
    with pytest.raises(ValidationError):
        NeuralCleanseConfig(schedule="greedy")  # type: ignore[arg-type]
    # the full scan ignores the scheduling fields, so short budgets stay valid
    assert NeuralCleanseConfig(steps=5, warmup_steps=50).schedule == "full"


def test_a_budget_within_the_default_warm_up_runs_the_full_scan_and_says_so() -> None:
    model = _model()
    short = _inverter(steps=30).invert(model, _data())
    full = _inverter(steps=30, schedule="full").invert(model, _data())
    assert short.diagnostics["schedule_used"] == "full (budget within the warm-up)"
    assert torch.equal(short.masks, full.masks) and short.flagged == full.flagged
