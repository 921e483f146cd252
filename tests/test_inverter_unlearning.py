"""NC unlearning: nothing flagged → the model is handed back untouched; flagged → the backdoor fades."""

from __future__ import annotations

import pytest
import torch
from bdtk_inverters.unlearning import NCUnlearning, NCUnlearningConfig
from test_inverter_neural_cleanse import TARGET, _data, _model
from torch import nn

from backdoor_toolkit import BdtkError, ConfigError, get_purifier

INVERSION = {"steps": 200, "batch_size": 16, "round_steps": 5, "patience": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _asr(model: nn.Module) -> float:
    """The planted trigger (bright bottom-right pixel) on the non-target validation images."""
    val = _data().val
    x = val.images[val.labels != TARGET].float() / 255
    x[:, :, -1, -1] = 1.0
    with torch.no_grad():
        return float((model(x).argmax(1) == TARGET).float().mean())


def test_registered_by_name() -> None:
    assert get_purifier("nc-unlearning") is NCUnlearning


def test_nothing_flagged_returns_the_model_unchanged() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = NCUnlearningConfig(inverter_config={**INVERSION, "threshold": 100.0})
    result = NCUnlearning(cfg, seed=0).purify(model, _data())  # type: ignore[arg-type]
    assert result.model is model and not result.modified and result.detected is False
    assert result.notes == "no backdoor detected"
    assert all(torch.equal(before[k], v) for k, v in result.model.state_dict().items())
    assert result.diagnostics["flagged"] == [] and "inversion" in result.stage_seconds


def test_flagged_target_is_unlearned_with_true_labels() -> None:
    model = _model()
    assert _asr(model) == 1.0
    cfg = NCUnlearningConfig(
        inverter_config=INVERSION, epochs=10, batch_size=8, lr=1.0, stamp_ratio=0.5, augment=False
    )
    result = NCUnlearning(cfg, seed=0).purify(model, _data())  # type: ignore[arg-type]
    assert result.detected is True and result.modified
    assert TARGET in result.diagnostics["flagged"]
    assert set(result.stage_seconds) == {"inversion", "unlearning"}
    assert _asr(result.model) < 0.9  # the toy's backdoor weight is large; it fades, not vanishes
    trigger_weight = result.model[1].weight[TARGET, -1].detach()  # type: ignore[index]
    assert float(trigger_weight) < 20.0 - 4.0


def test_bad_inverter_settings_fail_before_any_work() -> None:
    cfg = NCUnlearningConfig(inverter_config={"stepz": 3})
    with pytest.raises(ConfigError, match="stepz"):
        NCUnlearning(cfg, seed=0).purify(_model(), _data())  # type: ignore[arg-type]
    with pytest.raises(BdtkError, match="Unknown inverter"):
        NCUnlearning(NCUnlearningConfig(inverter="nural-cleanse"), seed=0).purify(_model(), _data())  # type: ignore[arg-type]
