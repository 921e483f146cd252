"""Named presets (`NAME:PRESET`): declaration and registration checks, resolution order, the CLI,
suites and config files, stored rows and leaderboards, and inverters chosen inside a purifier."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import Field
from rich.console import Console
from test_store import cell
from typer.testing import CliRunner

from backdoor_toolkit import (
    ADDED_FIELD,
    Attack,
    ConfigError,
    DefenseData,
    ImageClassifier,
    InversionResult,
    PluginMeta,
    Preset,
    PurificationResult,
    Purifier,
    StrictConfig,
    TriggerInverter,
    cells,
    create_inverter,
    get_inverter,
    get_purifier,
    resolve_config,
)
from backdoor_toolkit import benchmark as bench
from backdoor_toolkit.backdoor import BackdooredModel
from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.cells import plan_grid
from backdoor_toolkit.cli import app
from backdoor_toolkit.cli.benchmark import apply_overrides, results_table
from backdoor_toolkit.cli.common import parse_settings
from backdoor_toolkit.config import (
    BenchmarkConfig,
    PluginChoice,
    config_hash,
    hashed_config,
    load_config_file,
)
from backdoor_toolkit.data import Dataset
from backdoor_toolkit.errors import BdtkError, UnknownPresetError
from backdoor_toolkit.leaderboard import build_leaderboard
from backdoor_toolkit.plugins import get_registry, resolve_plugin
from backdoor_toolkit.results import CellResult, write_results
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.suites import load_suite
from backdoor_toolkit.testing import TINY_SPEC, ConformanceError, tiny_images, tiny_model

runner = CliRunner()
Register = Callable[..., str]


class KnobConfig(StrictConfig):
    a: int = Field(default=1, ge=0, le=1000, description="First knob")
    b: int = Field(default=2, ge=0, le=1000, description="Second knob")
    c: int = Field(default=3, ge=0, le=1000, description="Third knob")
    nested: dict[str, Any] = Field(default_factory=dict, description="Values handed on as they are")


class Knob(Purifier):
    """A purifier with presets that leaves the model alone and reports its config in the notes."""

    name = "knob"
    Config = KnobConfig
    config: KnobConfig
    meta = PluginMeta(summary="test-only purifier with presets")
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(values={"a": 10, "b": 20, "nested": {"k": 1}}, description="Both knobs as published"),
        "fast": Preset(values={"c": 0}, description="Third knob off"),
    }

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        c = self.config
        return PurificationResult(model=model, modified=False, notes=f"a={c.a} b={c.b} c={c.c}")


class Plain(Purifier):
    name = "plain-knob"
    Config = KnobConfig
    meta = PluginMeta(summary="test-only purifier without presets")

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        return PurificationResult(model=model, modified=False)


class ProbeConfig(StrictConfig):
    steps: int = Field(default=100, ge=1, le=10_000, description="Step budget")
    raw: bool = Field(default=False, description="Score raw norms")


#: The configs the probe inverter ran with, newest last.
PROBED: list[ProbeConfig] = []


class ProbeInverter(TriggerInverter):
    """Records the config it runs with and flags nothing, so a purifier using it stops at once."""

    name = "probe-inverter"
    Config = ProbeConfig
    config: ProbeConfig
    meta = PluginMeta(summary="test-only inverter")
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(values={"raw": True}, description="Raw norms, as published")
    }

    def invert(
        self, model: ImageClassifier, data: DefenseData, classes: list[int] | None = None
    ) -> InversionResult:
        PROBED.append(self.config)
        chosen = list(range(data.spec.num_classes)) if classes is None else classes
        k, (c, h, w) = len(chosen), data.spec.image_shape
        zeros = torch.zeros(k)
        return InversionResult(
            chosen, torch.zeros(k, 1, h, w), torch.zeros(k, c, h, w), torch.ones(k), zeros, zeros, []
        )


def one_line(text: str) -> str:
    return " ".join(text.split())


# --- declaration and registration --------------------------------------------------------------


def test_builtin_presets_are_registered_and_resolve() -> None:
    assert not get_registry().failures
    nc = create_inverter("neural-cleanse:paper", {"steps": 5})
    assert nc.config.model_dump()["log_norms"] is False and nc.config.model_dump()["steps"] == 5
    assert resolve_config("inverter", "neural-cleanse").model_dump()["log_norms"] is True
    mcldef = get_purifier("mcldef")
    paper = mcldef.presets["paper"]
    resolved = resolve_config("purifier", "mcldef:paper").model_dump()
    assert {k: resolved[k] for k in paper.values} == paper.values
    assert paper.values["epochs"] == 20 and paper.values["ce_weight"] == 0.0


def _variant(**attrs: Any) -> type[Purifier]:
    return type("Broken", (Knob,), {"name": "broken-knob", **attrs})


@pytest.mark.parametrize(
    ("presets", "message"),
    [
        (
            {"paper": Preset(values={"a": 5000}, description="too big")},
            r"presets\['paper'\] does not validate against Broken\.Config: a: Input should be less than "
            r"or equal to 1000",
        ),
        (
            {"paper": Preset(values={"d": 1}, description="no such field")},
            r"presets\['paper'\] does not validate.*d: Extra inputs are not permitted",
        ),
        ({"Paper": Preset(values={}, description="x")}, r"'Paper' is not a lower-case preset name"),
        ({"v1.2": Preset(values={}, description="x")}, r"'v1\.2' is not a lower-case preset name"),
        ({"paper": ({"a": 1}, "a tuple")}, r"presets\['paper'\] must be a Preset"),
        ({"paper": Preset(values={}, description="two\nlines")}, r"description must be one non-empty line"),
        ([("paper", Preset(values={}, description="x"))], r"presets must be a dict"),
    ],
)
def test_malformed_presets_are_refused_at_registration(
    bdtk_register: Register, presets: Any, message: str
) -> None:
    with pytest.raises(ConformanceError, match=message):
        bdtk_register(_variant(presets=presets))
    assert "broken-knob" not in get_registry().by_kind["purifier"]


# --- resolution --------------------------------------------------------------------------------


def test_resolution_order_defaults_then_preset_then_explicit(bdtk_register: Register) -> None:
    bdtk_register(Knob)
    assert resolve_config("purifier", "knob").model_dump() == {"a": 1, "b": 2, "c": 3, "nested": {}}
    assert resolve_config("purifier", "knob", "paper").model_dump() == {
        "a": 10,
        "b": 20,
        "c": 3,
        "nested": {"k": 1},
    }
    explicit = resolve_config("purifier", "knob:paper", overrides={"b": 200, "c": 0})
    assert explicit.model_dump() == {"a": 10, "b": 200, "c": 0, "nested": {"k": 1}}
    resolved = resolve_plugin("purifier", "knob", "paper", {"nested": {"j": 2}})
    assert resolved.label == "knob:paper" and resolved.preset == "paper" and resolved.name == "knob"
    assert resolved.config.model_dump()["nested"] == {"j": 2}  # field by field: a value replaces it
    assert Knob.presets["paper"].values["nested"] == {"k": 1}  # the preset itself is never changed
    with pytest.raises(ConfigError, match="names preset 'paper', but preset 'fast'"):
        resolve_config("purifier", "knob:paper", "fast")
    with pytest.raises(ConfigError, match=r"knob:paper': b: Input should be less than or equal"):
        resolve_config("purifier", "knob:paper", overrides={"b": 5000})


def test_unknown_preset_says_did_you_mean_and_lists_presets(bdtk_register: Register) -> None:
    bdtk_register(Knob, Plain)
    with pytest.raises(UnknownPresetError) as info:
        resolve_config("purifier", "knob:papr")
    assert str(info.value) == (
        "Unknown preset 'papr' of purifier 'knob'. Did you mean 'paper'? Available: fast, paper."
    )
    with pytest.raises(UnknownPresetError) as info:
        resolve_config("purifier", "plain-knob", "paper")
    assert str(info.value) == "Unknown preset 'paper' of purifier 'plain-knob': plain-knob has no presets."
    for spec in ("knob:", ":paper", "knob:paper:fast"):
        with pytest.raises(ConfigError, match="is not NAME or NAME:PRESET"):
            resolve_config("purifier", spec)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defense", "knob:papr"], "Unknown preset 'papr' of purifier 'knob'. Did you mean 'paper'? "),
        (["--defense", "plain-knob:paper"], "plain-knob has no presets."),
        (["--attack", "badnets:paper"], "Unknown preset 'paper' of attack 'badnets': badnets has no"),
        (["--defense", "knob:"], "is not NAME or NAME:PRESET"),
        (["--defense", "knob:paper", "--set", "knob.d=1"], "knob:paper.*d: Extra inputs"),
    ],
)
def test_cli_preset_errors_are_one_clear_line(
    bdtk_register: Register, tmp_path: Path, args: list[str], message: str
) -> None:
    bdtk_register(Knob, Plain)
    result = runner.invoke(app, ["benchmark", *args, "--db", str(tmp_path / "r.sqlite")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert message in one_line(result.output) or re.search(message, one_line(result.output)), result.output


def test_plugin_choice_parses_name_and_preset() -> None:
    assert PluginChoice.model_validate("mcldef:paper").model_dump() == {
        "name": "mcldef",
        "preset": "paper",
        "config": {},
    }
    choice = PluginChoice(name="mcldef:paper", config={"epochs": 3})
    assert (choice.name, choice.preset, choice.spec) == ("mcldef", "paper", "mcldef:paper")
    assert choice.label.startswith("mcldef:paper[")
    assert PluginChoice(name="mcldef", preset="paper") == PluginChoice.model_validate("mcldef:paper")
    assert PluginChoice(name="mcldef").preset is None and PluginChoice(name="mcldef").spec == "mcldef"
    with pytest.raises(ValueError, match="disagree"):
        PluginChoice(name="mcldef:paper", preset="fast")
    with pytest.raises(ValueError, match="is not NAME or NAME:PRESET"):
        PluginChoice.model_validate("mcldef::paper")


def test_set_overrides_a_preset_by_name_or_by_name_and_preset(bdtk_register: Register) -> None:
    bdtk_register(Knob)
    values: dict[str, Any] = {
        "model": "small-cnn",
        "attacks": [PluginChoice.model_validate("badnets").model_dump()],
        "defenses": [
            PluginChoice.model_validate(v).model_dump() for v in ("knob", "knob:paper", "knob:fast")
        ],
    }
    apply_overrides(values, ["knob.c=7", "knob:paper.b=5"])
    cfg = BenchmarkConfig.model_validate(values)
    (plan,) = plan_grid(cfg)
    configs = {c.defense_label: c.defense.config.model_dump() for c in plan.cells if c.defense}
    assert configs == {
        "knob": {"a": 1, "b": 2, "c": 7, "nested": {}},
        "knob:paper": {"a": 10, "b": 5, "c": 7, "nested": {"k": 1}},
        "knob:fast": {"a": 1, "b": 2, "c": 7, "nested": {}},  # the explicit c wins over the preset's 0
    }
    with pytest.raises(ConfigError, match="no attack or defense named 'knob:slow'"):
        apply_overrides(values, ["knob:slow.a=1"])
    assert parse_settings(["badnets.target=1", "badnets:x.mode=all-to-all"], "badnets:x") == {
        "target": 1,
        "mode": "all-to-all",
    }


# --- suites and config files ---------------------------------------------------------------------


def test_name_preset_in_suite_and_config_files(bdtk_register: Register, tmp_path: Path) -> None:
    bdtk_register(Knob)
    suite = tmp_path / "presets.toml"
    suite.write_text('model = "small-cnn"\nattacks = ["badnets"]\ndefenses = ["knob:paper", "knob"]\n\n')
    loaded = load_suite(str(suite))
    assert [d.spec for d in loaded.defenses] == ["knob:paper", "knob"]
    tables = tmp_path / "tables.toml"
    tables.write_text(
        'model = "small-cnn"\n\n'
        "[[defenses]]\n"
        'name = "knob"\n'
        'preset = "paper"\n'
        "config = { b = 7 }\n\n"
        "[[defenses]]\n"
        'name = "knob:fast"\n'
    )
    cfg = BenchmarkConfig.model_validate(load_config_file(tables))
    (plan,) = plan_grid(cfg)
    configs = {c.defense_label: c.defense.config.model_dump() for c in plan.cells if c.defense}
    assert configs["knob:paper"] == {"a": 10, "b": 7, "c": 3, "nested": {"k": 1}}
    assert configs["knob:fast"]["c"] == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "small-cnn"\n\n[[defenses]]\nname = "knob:"\n')
    with pytest.raises(ConfigError, match=r"defenses\.0 \(line 3\):.*is not NAME or NAME:PRESET"):
        load_suite(str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('defenses = ["knob:papr"]\n')
    with pytest.raises(
        ConfigError, match=r"unknown\.toml, defenses\[0\] 'knob:papr' \(line 1\).*Did you mean 'paper'"
    ):
        load_suite(str(unknown))  # named with its file and line when the suite is read


# --- stored rows, resume and leaderboards ----------------------------------------------------------


def test_a_cells_hash_covers_its_fields_code_and_setting_and_a_preset_is_its_own_cell() -> None:
    cfg = BenchmarkConfig.model_validate(
        {"model": "small-cnn", "attacks": ["badnets"], "defenses": ["mcldef", "mcldef:paper"]}
    )
    (plan,) = plan_grid(cfg)
    none, plain, paper = plan.cells
    setting = cells.run_setting(cfg)
    attack_code = cells.code_version(resolve_plugin("attack", "badnets"))
    assert attack_code.startswith("backdoor-toolkit ")  # the distribution and its version
    base = {
        "dataset": "fashion-mnist",
        "model": "small-cnn",
        "attack": "badnets",
        "attack_config": hashed_config(resolve_config("attack", "badnets")),
        "seed": 0,
        "code": {"attack": attack_code},
    }
    assert none.config_hash == config_hash({**base, "defense": "none", **setting})
    mcldef_config = hashed_config(resolve_config("purifier", "mcldef"))
    defense_code = cells.code_version(resolve_plugin("purifier", "mcldef"))
    cell_fields = {
        **base,
        "defense": "mcldef",
        "defense_config": mcldef_config,
        "code": {"attack": attack_code, "defense": defense_code},
    }
    assert plain.config_hash == config_hash({**cell_fields, **setting})
    assert paper.config_hash != plain.config_hash
    assert (paper.defense_name, paper.defense_label) == ("mcldef", "mcldef:paper")


class _Before(StrictConfig):
    rate: float = 0.1


class _After(_Before):
    """The same config after a release added an option whose default keeps the old behaviour."""

    weight: float = Field(default=0.0, json_schema_extra=ADDED_FIELD)
    mode: str = "a"  # added without the mark: it changes every hash


def test_an_added_field_at_its_default_keeps_the_hash_of_stored_cells() -> None:
    before = hashed_config(_Before())
    assert "weight" not in hashed_config(_After())
    assert config_hash(before) != config_hash(hashed_config(_After()))  # `mode` is unmarked
    assert {k: v for k, v in hashed_config(_After()).items() if k != "mode"} == before
    # set away from its default, the added field is part of the cell's identity
    assert hashed_config(_After(weight=0.5))["weight"] == 0.5
    # MCLDef's added options: a default cell hashes as before they existed, and stored rows
    # still record them in full
    mcldef = resolve_config("purifier", "mcldef")
    assert not {"distill_weight", "distill_temperature", "select_epoch"} & set(hashed_config(mcldef))
    assert {"distill_weight", "select_epoch"} <= set(mcldef.model_dump())
    changed = resolve_config("purifier", "mcldef", overrides={"distill_weight": 1.0})
    assert hashed_config(changed)["distill_weight"] == 1.0


@pytest.fixture
def tiny_grid(monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """Grids on 200/80 tiny 16×16 images whose "backdoored" model is the conformance kit's tiny one:
    the bookkeeping runs for real, in a second, with no training."""
    data = Dataset(TINY_SPEC, tiny_images(n=200, seed=0), tiny_images(n=80, seed=1))

    def victim(dataset: Dataset, model_name: str, attack: Attack, *args: Any) -> BackdooredModel:
        poisoned = attack.choose_poisoned(dataset.train.labels)
        return BackdooredModel(tiny_model(dataset.spec), attack, poisoned, "tiny", False, 0.0)

    for module in (bench, cells):
        monkeypatch.setattr(module, "grid_dataset", lambda config, name: data)
    monkeypatch.setattr(cells, "backdoored_model", victim)
    return data


def test_stored_row_records_preset_and_resolved_config(
    bdtk_register: Register, tiny_grid: Dataset, tmp_path: Path
) -> None:
    bdtk_register(Knob)
    cfg = BenchmarkConfig.model_validate(
        {
            "model": "small-cnn",
            "training": {"epochs": 1},
            "clean_ratio": 0.25,
            "device": "cpu",
            "cache_dir": str(tmp_path / "cache"),
            "attacks": ["badnets"],
            "defenses": ["knob", {"name": "knob:paper", "config": {"c": 9}}],
        }
    )
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run_benchmark(cfg, store=store)
        assert [r.defense_label for r in rows] == ["none", "knob", "knob:paper"]
        none, plain, paper = rows
        assert all(r.status == "ok" for r in rows), [r.error for r in rows]
        assert (none.defense_preset, plain.defense_preset, paper.defense_preset) == (None, None, "paper")
        assert paper.defense == "knob" and paper.attack_preset is None
        assert paper.defense_config == {"a": 10, "b": 20, "c": 9, "nested": {"k": 1}}
        assert paper.notes == "a=10 b=20 c=9"
        assert len({r.config_hash for r in rows}) == 3
        stored = store.get(paper.config_hash)
        assert stored is not None  # the store keeps the preset and the resolved config
        assert (stored.defense_preset, stored.defense_config) == ("paper", paper.defense_config)
        fresh: list[CellResult] = []
        again = run_benchmark(cfg, fresh.append, store=store)
        assert fresh == []  # resume: nothing reruns
        assert [r.config_hash for r in again] == [r.config_hash for r in rows]
    out = tmp_path / "results.json"
    write_results(out, cfg, rows)
    payload = json.loads(out.read_text())
    assert payload["results"][2]["defense_preset"] == "paper"
    assert payload["config"]["defenses"][1] == {"name": "knob", "preset": "paper", "config": {"c": 9}}
    text = io.StringIO()
    Console(file=text, width=200).print(results_table(rows))
    assert "knob:paper" in text.getvalue()
    board = build_leaderboard(rows)
    assert [e.defense for e in board.boards[0].entries if e.defense != "none"] == ["knob", "knob:paper"]


def test_cli_benchmark_with_a_preset_and_set(
    bdtk_register: Register, tiny_grid: Dataset, tmp_path: Path
) -> None:
    bdtk_register(Knob)
    out = tmp_path / "results.json"
    args = ["benchmark", "--model", "small-cnn", "--epochs", "1", "--clean-ratio", "0.25", "--device", "cpu"]
    args += ["--defense", "knob:paper", "--set", "knob.b=7", "--attack", "badnets"]
    args += ["--db", str(tmp_path / "r.sqlite"), "--output", str(out), "--cache-dir", str(tmp_path / "c")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["defense"], r["defense_preset"]) for r in rows] == [("none", None), ("knob", "paper")]
    assert rows[1]["defense_config"] == {"a": 10, "b": 7, "c": 3, "nested": {"k": 1}}
    assert "knob:paper" in result.output


def test_leaderboard_keeps_a_preset_apart_and_old_rows_validate(tmp_path: Path) -> None:
    old = cell("mcldef", config_hash="old").model_dump()
    del old["attack_preset"], old["defense_preset"]
    assert CellResult.model_validate(old).defense_preset is None  # rows stored before presets
    rows = [
        cell("none", config_hash="n"),
        cell("mcldef", config_hash="m", ba=0.8),
        cell("mcldef", config_hash="p", ba=0.6, defense_preset="paper", defense_config={"epochs": 20}),
        cell("mcldef", config_hash="b", seed=1, attack_preset="xyz", attack_config={"target": 1}),
    ]
    board = build_leaderboard(rows)
    per_attack = {b.attack: b for b in board.boards if b.attack}
    assert set(per_attack) == {"badnets", "badnets:xyz"}
    entries = {e.defense: e for e in per_attack["badnets"].entries}
    assert set(entries) == {"none", "mcldef", "mcldef:paper"}
    assert entries["mcldef"].stats["ba"].mean == 0.8 and entries["mcldef:paper"].stats["ba"].mean == 0.6
    with ResultStore(tmp_path / "r.sqlite") as store:
        for row in rows:
            store.put(row)
        assert len(store.rows(attacks=["badnets"])) == 4
        assert [r.config_hash for r in store.rows(attacks=["badnets:xyz"])] == ["b"]


# --- bdtk plugins show -----------------------------------------------------------------------------


def test_plugins_show_lists_presets(bdtk_register: Register) -> None:
    bdtk_register(Knob, Plain)
    result = runner.invoke(app, ["plugins", "show", "knob"])
    assert result.exit_code == 0, result.output
    text = one_line(result.stdout)
    assert "presets: paper, fast" in text
    assert "knob presets (choose one with --defense knob:PRESET" in text
    assert re.search(r"knob:paper Both knobs as published a=10", text), text
    assert 'nested={"k": 1}' in text and "knob:fast Third knob off c=0" in text
    payload = json.loads(runner.invoke(app, ["plugins", "show", "knob", "--json"]).stdout)
    assert payload[0]["presets"] == {
        "paper": {"values": {"a": 10, "b": 20, "nested": {"k": 1}}, "description": "Both knobs as published"},
        "fast": {"values": {"c": 0}, "description": "Third knob off"},
    }
    plain = json.loads(runner.invoke(app, ["plugins", "show", "plain-knob", "--json"]).stdout)
    assert plain[0]["presets"] == {}
    assert "presets: none" in one_line(runner.invoke(app, ["plugins", "show", "plain-knob"]).stdout)
    listing = json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)["plugins"]
    assert {p["name"]: p["presets"] for p in listing}["knob"] == ["paper", "fast"]


# --- inverters chosen by name inside a purifier's config -------------------------------------------


def test_inverter_preset_inside_a_purifier_config(
    bdtk_register: Register, bdtk_model: ImageClassifier, bdtk_defense_data: DefenseData
) -> None:
    bdtk_register(ProbeInverter)
    inverter = create_inverter("probe-inverter:paper", {"steps": 2}, seed=3)
    assert isinstance(inverter, ProbeInverter) and inverter.seed == 3
    assert inverter.config.model_dump() == {"steps": 2, "raw": True}
    cls = get_purifier("nc-unlearning")
    config = resolve_config(
        "purifier",
        "nc-unlearning",
        overrides={"inverter": "probe-inverter:paper", "inverter_config": {"steps": 2}},
    )
    result = cls(config, seed=0).purify(bdtk_model, bdtk_defense_data)
    assert result.modified is False and PROBED[-1].model_dump() == {"steps": 2, "raw": True}
    bad = resolve_config("purifier", "nc-unlearning", overrides={"inverter": "probe-inverter:papr"})
    with pytest.raises(UnknownPresetError, match="Did you mean 'paper'"):
        cls(bad, seed=0).purify(bdtk_model, bdtk_defense_data)
    with pytest.raises(BdtkError, match=r"selects a preset of 'probe-inverter'.*create_inverter"):
        get_inverter("probe-inverter:paper")  # a lookup by name alone would drop the preset
