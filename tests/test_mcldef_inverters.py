"""MCLDef with several inverters: the config accepts a list, flags are united, and each flagged class
keeps the trigger of the inverter whose trigger succeeds most often on val (ties: listed first).

Everything here runs on hand-made `InversionResult`s or throwaway inverters, so it takes no
training; the end-to-end check on a planted global backdoor is in test_inverter_blend.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, cast

import pytest
import torch
from bdtk_mcldef.inverters import (
    BY_INVERTER,
    FLAGGED_BY,
    INVERTERS,
    INVERTERS_SKIPPED,
    TRIGGER_FROM,
    combine,
    pick,
)
from bdtk_mcldef.mcldef import InverterFailedError, MCLDef, MCLDefConfig
from pydantic import Field
from typer.testing import CliRunner

from backdoor_toolkit import (
    ConfigError,
    DefenseData,
    ImageClassifier,
    InversionKeys,
    InversionResult,
    PluginMeta,
    StrictConfig,
    TriggerInverter,
    build_config,
    create_purifier,
    resolve_config,
)
from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.cli import app
from backdoor_toolkit.cli.common import parse_value
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.errors import UnknownNameError
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.testing import tiny_defense_data, tiny_model

K = InversionKeys


def _result(
    flagged: list[int], success: list[float], fill: float, steps: int = 10, index: float = 3.0
) -> InversionResult:
    """Four classes; every mask is `fill` everywhere (so results are told apart by their masks) and
    every anomaly index is `index`."""
    k = len(success)
    masks = torch.full((k, 1, 16, 16), fill)
    return InversionResult(
        classes=list(range(k)),
        masks=masks,
        patterns=torch.full((k, 1, 16, 16), fill),
        mask_norms=masks.flatten(1).sum(1),
        attack_success=torch.tensor(success),
        anomaly_index=torch.full((k,), index),
        flagged=flagged,
        seconds=1.5,
        diagnostics={K.CLASS_STEPS: steps, K.FULL_SCAN_CLASS_STEPS_BOUND: 4 * steps, K.SCHEDULE_USED: "full"},
    )


def test_flags_are_united_and_each_class_keeps_the_trigger_of_its_clearest_outlier() -> None:
    nc = _result([0, 2], [0.99, 0.1, 0.99, 0.2], fill=0.1, index=2.5)
    blend = _result([1, 2], [0.3, 0.97, 0.95, 0.2], fill=0.2, index=4.0)
    merged = combine([("neural-cleanse", nc), ("blend-inversion", blend)])
    assert merged.flagged == [0, 1, 2]
    d = merged.diagnostics
    assert d[INVERTERS] == ["neural-cleanse", "blend-inversion"]
    assert d[FLAGGED_BY] == {
        "0": ["neural-cleanse"],
        "1": ["blend-inversion"],
        "2": ["neural-cleanse", "blend-inversion"],
    }
    # class 2: both flagged it; it stands out more under blend inversion (index 4.0 against 2.5),
    # although Neural Cleanse's trigger succeeds a little more often on val
    assert d[TRIGGER_FROM] == {"0": "neural-cleanse", "1": "blend-inversion", "2": "blend-inversion"}
    fills = merged.masks[:, 0, 0, 0].tolist()
    assert fills == pytest.approx([0.1, 0.2, 0.2, 0.1])  # class 3, flagged by none: the first inverter's
    assert merged.attack_success.tolist() == pytest.approx([0.99, 0.97, 0.95, 0.2])
    assert merged.anomaly_index.tolist() == pytest.approx([2.5, 4.0, 4.0, 2.5])
    assert merged.trigger(1).mask[0, 0, 0] == pytest.approx(0.2)
    # each inverter's own record, under the keys every purifier uses
    assert d[BY_INVERTER]["neural-cleanse"][K.FLAGGED] == [0, 2]
    assert d[BY_INVERTER]["blend-inversion"][K.FLAGGED] == [1, 2]
    assert d[K.CLASS_STEPS] == 20 and d[K.FULL_SCAN_CLASS_STEPS_BOUND] == 80
    assert merged.seconds == pytest.approx(3.0)
    assert merged.summary()[K.FLAGGED] == [0, 1, 2]


def test_equal_indices_go_to_val_success_then_to_the_inverter_listed_first() -> None:
    a, b = _result([1], [0.5, 0.9, 0.5, 0.5], 0.1), _result([1], [0.5, 0.8, 0.5, 0.5], 0.2)
    assert pick([("a", a), ("b", b)], 1, ["a", "b"]) == "a"
    assert pick([("b", b), ("a", a)], 1, ["a", "b"]) == "a"
    b.attack_success[1] = 0.9
    assert pick([("a", a), ("b", b)], 1, ["a", "b"]) == "a"
    assert pick([("b", b), ("a", a)], 1, ["a", "b"]) == "b"
    assert pick([("a", a), ("b", b)], 1, ["b"]) == "b"  # only among those that flagged it


def test_a_known_target_takes_the_best_trigger_of_every_inverter() -> None:
    # known-target inversions compute no index (NaN): val success decides
    nan = float("nan")
    a = _result([], [0.5, 0.2, 0.5, 0.5], 0.1, index=nan)
    b = _result([], [0.5, 0.7, 0.5, 0.5], 0.2, index=nan)
    merged = combine([("a", a), ("b", b)], known=1)
    assert merged.flagged == [] and merged.diagnostics[TRIGGER_FROM] == {"1": "b"}
    assert merged.masks[1, 0, 0, 0] == pytest.approx(0.2)


def test_nothing_flagged_keeps_the_first_inverters_ranking() -> None:
    a = _result([], [0.5] * 4, 0.1)
    a.mask_norms = torch.tensor([4.0, 1.0, 3.0, 2.0])
    b = _result([], [0.5] * 4, 0.2)
    b.mask_norms = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert combine([("a", a), ("b", b)]).ranked() == [1, 3, 2, 0]


# --- the config --------------------------------------------------------------------------------


def _config(values: dict[str, object]) -> MCLDefConfig:
    return cast(MCLDefConfig, build_config(MCLDef.Config, values, "mcldef"))


def test_a_single_inverter_string_and_the_presets_are_unchanged() -> None:
    assert cast(MCLDefConfig, resolve_config("purifier", "mcldef")).inverter == "neural-cleanse:k-arm"
    assert cast(MCLDefConfig, resolve_config("purifier", "mcldef:paper")).inverter == "neural-cleanse"
    flat = _config({"inverter": "blend-inversion", "inverter_config": {"steps": 7}})
    assert flat.inverter == "blend-inversion" and flat.inverter_config == {"steps": 7}


def test_a_list_of_inverters_with_settings_per_inverter() -> None:
    # as `--set 'mcldef.inverter=["neural-cleanse:k-arm","blend-inversion"]'` reads it
    value = parse_value('["neural-cleanse:k-arm","blend-inversion"]')
    cfg = _config({"inverter": value, "inverter_config": {"blend-inversion": {"steps": 50}}})
    assert cfg.inverter == ["neural-cleanse:k-arm", "blend-inversion"]
    assert _config(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"inverter": []}, r"inverter: .*the list of inverters is empty; name at least one"),
        ({"inverter": ["blend-inversion", "blend-inversion"]}, "repeat"),
        ({"inverter": ["neural-cleanse", "blend-inversion"], "inverter_config": {"steps": 5}}, "maps each"),
        ({"inverter": ["neural-cleanse", "blend-inversion"], "inverter_config": {"nc": {}}}, "maps each"),
    ],
)
def test_bad_inverter_lists_are_config_errors(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(values)


# --- end to end with throwaway inverters ---------------------------------------------------------


class _FixedConfig(StrictConfig):
    flag: int = Field(default=-1, ge=-1, le=3, description="Class to flag (−1: none)")


def _fixed(name: str, fill: float, success: float) -> type[TriggerInverter]:
    class Fixed(TriggerInverter):
        Config = _FixedConfig
        config: _FixedConfig
        meta = PluginMeta(summary="test-only inverter with a fixed answer")
        calls: ClassVar[list[list[int] | None]] = []

        def invert(
            self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
        ) -> InversionResult:
            type(self).calls.append(classes)
            chosen = list(range(4)) if classes is None else classes
            r = _result([], [success] * len(chosen), fill)
            r.classes = chosen
            r.flagged = [self.config.flag] if self.config.flag in chosen else []
            return r

    Fixed.name = name
    return Fixed


def test_mcldef_purifies_every_class_any_inverter_flags(bdtk_register: Callable[..., str]) -> None:
    first, second = _fixed("test-first-inv", 0.05, 0.6), _fixed("test-second-inv", 0.08, 0.9)
    bdtk_register(first, second)
    cfg = {
        "inverter": ["test-first-inv", "test-second-inv"],
        "inverter_config": {"test-first-inv": {"flag": 1}, "test-second-inv": {"flag": 2}},
        "epochs": 1,
        "early_stop": False,
        "batch_size": 16,
    }
    purifier = MCLDef(_config(cfg), seed=0)
    model, data = copy.deepcopy(tiny_model()), tiny_defense_data()
    result = purifier.purify(model, data)
    d = result.diagnostics
    assert result.modified and result.detected
    assert d["purified_targets"] == [1, 2] and d[K.FLAGGED] == [1, 2]
    assert d[FLAGGED_BY] == {"1": ["test-first-inv"], "2": ["test-second-inv"]}
    assert d[TRIGGER_FROM] == {"1": "test-first-inv", "2": "test-second-inv"}
    assert set(d[BY_INVERTER]) == {"test-first-inv", "test-second-inv"}
    assert "2 by test-second-inv" in result.notes
    assert result.inversion is not None and result.inversion.flagged == [1, 2]
    assert first.calls == [None] and second.calls == [None]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("first_flags", "second_runs"),
    [(1, False), (-1, True)],
    ids=["first-flags-second-skipped", "first-flags-nothing-second-runs"],
)
def test_fallback_mode_runs_the_next_inverter_only_while_nothing_is_flagged(
    bdtk_register: Callable[..., str], first_flags: int, second_runs: bool
) -> None:
    first, second = _fixed("test-first-inv", 0.05, 0.6), _fixed("test-second-inv", 0.08, 0.9)
    bdtk_register(first, second)
    cfg = {
        "inverter": ["test-first-inv", "test-second-inv"],
        "inverter_mode": "fallback",
        "inverter_config": {"test-first-inv": {"flag": first_flags}, "test-second-inv": {"flag": 2}},
        "epochs": 1,
        "early_stop": False,
        "batch_size": 16,
    }
    result = MCLDef(_config(cfg), seed=0).purify(copy.deepcopy(tiny_model()), tiny_defense_data())
    d = result.diagnostics
    assert first.calls == [None]  # type: ignore[attr-defined]
    assert second.calls == ([None] if second_runs else [])  # type: ignore[attr-defined]
    expected = [2] if second_runs else [1]
    assert result.modified and d["purified_targets"] == expected and d[K.FLAGGED] == expected
    assert d[INVERTERS] == (["test-first-inv", "test-second-inv"] if second_runs else ["test-first-inv"])
    assert d[INVERTERS_SKIPPED] == ([] if second_runs else ["test-second-inv"])


# --- bad input: an unknown name, an inverter that fails mid-scan -----------------------------------


class _Failing(TriggerInverter):
    """Raises inside `invert`, as a broken or crashing inverter would."""

    name = "test-failing-inv"
    Config = _FixedConfig
    config: _FixedConfig
    meta = PluginMeta(summary="test-only inverter that raises")

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        raise RuntimeError("scan crashed at step 7")


def test_an_unknown_inverter_in_the_list_fails_before_any_inverter_runs(
    bdtk_register: Callable[..., str],
) -> None:
    first = _fixed("test-first-inv", 0.05, 0.6)
    bdtk_register(first)
    values = {"inverter": ["test-first-inv", "nural-cleanse"]}
    with pytest.raises(
        UnknownNameError, match=r"Unknown inverter 'nural-cleanse'\. Did you mean 'neural-cleanse'"
    ):
        create_purifier("mcldef", values)  # the runner instantiates every defense before training
    assert first.calls == []  # type: ignore[attr-defined]
    bad_setting = {
        "inverter": ["test-first-inv", "blend-inversion"],
        "inverter_config": {"blend-inversion": {"stepz": 3}},
    }
    with pytest.raises(ConfigError, match="stepz"):  # a bad setting of any listed inverter, too
        create_purifier("mcldef", bad_setting)


def test_an_unknown_inverter_via_benchmark_set_is_one_line_before_training(tmp_path: Path) -> None:
    args = ["benchmark", "-a", "badnets", "-d", "mcldef", "--model", "small-cnn", "--train-size", "600"]
    args += [
        "--set",
        'mcldef.inverter=["neural-cleanse:k-arm","blend-inversoin"]',
        "--db",
        str(tmp_path / "r.db"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Unknown inverter 'blend-inversoin'. Did you mean 'blend-inversion'" in text
    assert "Available: blend-inversion, neural-cleanse, periodic-inversion" in text
    assert "Traceback" not in text
    assert "Training" not in text
    with ResultStore(tmp_path / "r.db") as store:
        assert len(store) == 0  # refused while checking the grid: nothing ran, nothing was stored
    empty = CliRunner().invoke(
        app, [*args[:-4], "--set", "mcldef.inverter=[]", "--db", str(tmp_path / "r.db")]
    )
    assert empty.exit_code == 2 and "the list of inverters is empty" in " ".join(empty.output.split())


def _mcldef_with_a_failing_second_inverter() -> dict[str, object]:
    return {
        "inverter": ["test-first-inv", "test-failing-inv"],
        "inverter_config": {"test-first-inv": {"flag": 1}},
        "epochs": 1,
        "early_stop": False,
        "batch_size": 16,
    }


def test_an_inverter_failing_mid_scan_fails_the_purification_naming_it(
    bdtk_register: Callable[..., str],
) -> None:
    first = _fixed("test-first-inv", 0.05, 0.6)
    bdtk_register(first, _Failing)
    purifier = create_purifier("mcldef", _mcldef_with_a_failing_second_inverter())
    model = copy.deepcopy(tiny_model())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InverterFailedError) as caught:
        purifier.purify(model, tiny_defense_data())
    message = str(caught.value)
    assert "inverter 'test-failing-inv' (2 of 2) failed: RuntimeError: scan crashed at step 7" in message
    assert "the other inverters' results are not used on their own" in message and "\n" not in message
    assert first.calls == [None]  # type: ignore[attr-defined]  # the first one ran, its flag was not used
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing purified
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_benchmark_cell_whose_inverter_fails_is_failed_with_its_message(
    bdtk_register: Callable[..., str], tmp_path: Path
) -> None:
    bdtk_register(_fixed("test-first-inv", 0.05, 0.6), _Failing)
    cfg = BenchmarkConfig.model_validate(
        {
            "model": "small-cnn",
            "train_size": 600,
            "test_size": 200,
            "training": {"epochs": 1},
            "device": "cpu",
            "defenses": [{"name": "mcldef", "config": _mcldef_with_a_failing_second_inverter()}],
        }
    )
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run_benchmark(cfg, store=store)
        assert [(r.defense, r.status) for r in rows] == [("none", "ok"), ("mcldef", "failed")]
        failed = store.get(rows[1].config_hash)
    assert failed is not None and failed.asr is None and failed.diagnostics in (None, {})
    assert failed.error is not None
    assert "inverter 'test-failing-inv' (2 of 2) failed: RuntimeError: scan crashed at step 7" in failed.error
    assert "scan crashed at step 7" in (failed.notes or "")  # the inverter's traceback is kept


# --- refine_inverter: a second trigger for the classes the detector chose -----------------------


def test_refine_inverter_adds_its_trigger_for_the_chosen_classes_only(
    bdtk_register: Callable[..., str],
) -> None:
    """Detection stays with `inverter`; the refiner is asked about the chosen classes alone, and
    its flags (it flags class 3 here) are ignored."""
    detector, refiner = _fixed("test-first-inv", 0.05, 0.6), _fixed("test-second-inv", 0.3, 0.9)
    bdtk_register(detector, refiner)
    cfg = {
        "inverter": "test-first-inv",
        "inverter_config": {"flag": 1},
        "refine_inverter": "test-second-inv",
        "refine_config": {"flag": 3},
        "epochs": 1,
        "early_stop": False,
        "batch_size": 16,
    }
    result = MCLDef(_config(cfg), seed=0).purify(copy.deepcopy(tiny_model()), tiny_defense_data())
    d = result.diagnostics
    assert result.modified and d["purified_targets"] == [1] and d["refined_targets"] == [1]
    assert refiner.calls == [[1]]  # type: ignore[attr-defined]
    assert set(d["val_trigger_asr_after"]) == {"1", "1 (trigger 2)"}  # both triggers watched
    assert "Also unlearned the trigger of 'test-second-inv' for class(es) [1]" in result.notes
    # a refiner whose trigger does not fire is not used, and says so
    weak = _fixed("test-weak-inv", 0.3, 0.1)
    bdtk_register(weak)
    cfg["refine_inverter"], cfg["refine_config"] = "test-weak-inv", {}
    result = MCLDef(_config(cfg), seed=0).purify(copy.deepcopy(tiny_model()), tiny_defense_data())
    assert result.diagnostics["refined_targets"] == [] and "fires below min_attack_success" in result.notes


def test_a_failing_refine_inverter_fails_the_purification_naming_it(
    bdtk_register: Callable[..., str],
) -> None:
    bdtk_register(_fixed("test-first-inv", 0.05, 0.6), _Failing)
    cfg = {**_mcldef_with_a_failing_second_inverter(), "inverter": "test-first-inv"}
    cfg.update(inverter_config={"flag": 1}, refine_inverter="test-failing-inv")
    model = copy.deepcopy(tiny_model())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InverterFailedError, match="refine_inverter 'test-failing-inv' failed: RuntimeError"):
        create_purifier("mcldef", cfg).purify(model, tiny_defense_data())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UnknownNameError, match="Did you mean 'blend-inversion'"):
        create_purifier("mcldef", {"refine_inverter": "blend-inversoin"})


@pytest.mark.parametrize(
    "values",
    [
        {"target": 0, "inverter_config": {"target": 5}},
        {
            "inverter": ["neural-cleanse", "blend-inversion"],
            "inverter_config": {"blend-inversion": {"classes": [1]}},
        },
        {"refine_inverter": "blend-inversion", "refine_config": {"target": 2}},
    ],
    ids=["flat", "per-inverter", "refine"],
)
def test_an_inverters_own_target_or_classes_is_a_config_error(values: dict[str, object]) -> None:
    """MCLDef passes the classes to scan; an inverter's own target was silently overridden."""
    with pytest.raises(ConfigError, match="MCLDef chooses the classes its inverters scan"):
        create_purifier("mcldef", values)
