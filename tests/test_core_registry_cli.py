"""The registry through the CLI: built-ins come from entry points, a throwaway plugin registered
through the hook is listed and usable by `bdtk benchmark`, and bad input gets one clear message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner

from backdoor_toolkit import (
    Attack,
    AttackConfig,
    DefenseData,
    ImageClassifier,
    PluginMeta,
    PurificationResult,
    Purifier,
    Register,
    StrictConfig,
    hookimpl,
)
from backdoor_toolkit.cli import app
from backdoor_toolkit.plugins import get_registry, register_plugin, unregister_plugin

runner = CliRunner()


class ZeroHeadConfig(StrictConfig):
    scale: float = Field(default=0.0, ge=0.0, le=1.0, description="Factor applied to the head's weights")


class ZeroHead(Purifier):
    """A throwaway defense: scales the classifier head, which makes every prediction a tie."""

    name = "zero-head"
    Config = ZeroHeadConfig
    config: ZeroHeadConfig
    meta = PluginMeta(summary="test-only purifier")

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        with torch.no_grad():
            model.fc.weight.mul_(self.config.scale)
        return PurificationResult(model=model, notes="head scaled")


class _Plugin:
    @hookimpl
    def register_purifiers(self, register: Register) -> None:
        register(ZeroHead)


@pytest.fixture
def zero_head() -> Iterator[None]:
    register_plugin(_Plugin(), "test-zero-head")
    yield
    unregister_plugin("test-zero-head")


def test_builtins_are_found_through_entry_points() -> None:
    infos = {(i.kind, i.name): i for i in get_registry().all()}
    assert infos[("attack", "badnets")].source.distribution == "backdoor-toolkit"
    assert infos[("purifier", "finetune")].source.plugin == "baselines"


def test_plugins_json_lists_kind_name_distribution_version(zero_head: None) -> None:
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(p["kind"], p["name"]): p for p in json.loads(result.stdout)["plugins"]}
    assert rows[("purifier", "zero-head")]["distribution"] == "(in-process)"
    assert rows[("attack", "badnets")]["version"]


@pytest.mark.parametrize("width", [80, 120])
def test_listings_never_cut_a_name_at_narrow_widths(
    zero_head: None, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plugin, preset, field and model names are what a user types next: at 80 columns every one
    appears whole in `bdtk plugins`, `bdtk plugins show` and `bdtk models`, and no line is wider
    than the terminal; only prose folds."""
    from rich.console import Console

    from backdoor_toolkit.cli import plugins as plugins_cli
    from backdoor_toolkit.cli import zoo
    from backdoor_toolkit.models import available_models

    for module, attr in ((plugins_cli, "out"), (zoo, "console")):
        monkeypatch.setattr(module, attr, Console(width=width, highlight=False, color_system=None))
    listing = runner.invoke(app, ["plugins"])
    assert listing.exit_code == 0, listing.output
    lines = listing.stdout.splitlines()
    assert max(len(line) for line in lines) <= width
    words = listing.stdout.split()
    for info in get_registry().all():
        assert info.name in words, info.name  # whole, as its own word
        assert all(f"{preset}," in words or preset in words for preset in info.cls.presets)
    assert "(in-process)" in listing.stdout and "…" not in listing.stdout

    shown = runner.invoke(app, ["plugins", "show", "mcldef"])
    assert shown.exit_code == 0, shown.output
    assert max(len(line) for line in shown.stdout.splitlines()) <= width
    from backdoor_toolkit.plugins import get_plugin

    fields = get_plugin("purifier", "mcldef").cls.Config.model_fields
    shown_words = shown.stdout.split()
    assert all(name in shown_words for name in fields)
    assert "FieldInfo" not in shown.stdout  # types as a user writes them, not pydantic's repr
    assert "str | list[str]" in " ".join(shown_words)

    models = runner.invoke(app, ["models"])
    assert all(entry.name in models.stdout.split() for entry in available_models())


def test_throwaway_plugin_runs_in_benchmark(zero_head: None, tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "small-cnn", "train_size": 400, "test_size": 200}))
    out = tmp_path / "results.json"
    result = runner.invoke(
        app,
        [
            "benchmark",
            "--config",
            str(config),
            "--defense",
            "zero-head",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [r["defense"] for r in rows] == ["none", "zero-head"]
    zeroed = rows[1]
    assert zeroed["status"] == "ok" and zeroed["notes"] == "head scaled"
    # a constant head predicts one class for everything: BA collapses to about one class's share
    assert zeroed["ba"] <= 0.2
    assert zeroed["provenance"]["defense_plugin"] == "(in-process) "


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "badnet"], "Unknown attack 'badnet'. Did you mean 'badnets'"),
        (["--defense", "fine-tune"], "Did you mean 'finetune'"),
        (["--dataset", "fmnist"], "Unknown dataset 'fmnist'"),
        (["--model", "wrn-16"], "Unknown model 'wrn-16'"),
        (["--set", "finetune.epoch=3"], "finetune.*epoch.*Extra inputs"),
        (["--set", "finetune.epochs=0"], "epochs.*greater than or equal to 1"),
        (["--set", "badnets.target=12"], "target 12 is outside"),
        (["--set", "nad.beta=1"], "no attack or defense named 'nad'"),
        (["--clean-ratio", "0.9"], "clean_ratio"),
        (["--config", "missing.toml"], "does not exist"),
        (["--seed", "4294967296"], "less than or equal to 4294967295"),  # would wrap onto seed 0
        (["--seed", "99999999999999999999"], "less than or equal to 4294967295"),
        (["--seed", "-1"], "greater than or equal to 0"),
        (["--seed", "0", "--seed", "0"], "repeats '0'; give each one once"),
        (["--defense", "finetune", "--defense", "finetune"], "repeats 'finetune'; give each one once"),
        (["--threads", "1000"], "more than the .* CPU core"),
        (["--clean-ratio", "nan"], "finite number"),  # not "should be ≤ 0.5"
        (["--set", "finetune.lr=inf"], "finite number"),
        (["--config", "README.md"], "give a .toml or .json file"),
        (["--cache-dir", "README.md"], "is a file; give a folder"),
        (
            ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"],
            "available|Unknown",
        ),
    ],
)
def test_bad_input_gets_one_clear_message(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["benchmark", *args])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert __import__("re").search(message, result.output.replace("\n", " ")), result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["benchmark", "--seed", "-1"], "Invalid value for '--seed'.* benchmark --help"),
        (["benchmark", "--sed", "1"], "No such option: --sed.*--seed"),
        (["benchmak"], "No such command 'benchmak'.*benchmark"),
        (["plugins", "show"], "Missing argument.* plugins show --help"),
        (["inspect", "--threshold", "abc"], "Invalid value for '--threshold'"),
    ],
)
def test_usage_errors_are_one_line_like_every_other_bad_input(args: list[str], message: str) -> None:
    """Click's own errors (parsing, types, ranges) read like bdtk's: one `Error:` line, exit 2."""
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert __import__("re").search(message, lines[0]), result.output


def test_help_and_a_bare_bdtk_still_show_the_help() -> None:
    assert runner.invoke(app, ["benchmark", "--help"]).exit_code == 0
    bare = runner.invoke(app, [])
    assert "Usage" in bare.output and "benchmark" in bare.output


def test_malformed_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text("model = [unclosed")
    result = runner.invoke(app, ["benchmark", "--config", str(bad)])
    assert result.exit_code == 2 and "Cannot parse config file" in result.output
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('modle = "wrn-16-1"\n')
    result = runner.invoke(app, ["benchmark", "--config", str(wrong)])
    assert result.exit_code == 2 and "modle" in result.output


class PlainConfig(StrictConfig):
    size: int = Field(default=3, ge=1, le=8, description="Patch size")


class PlainConfigAttack(Attack):
    """An attack whose Config is a plain StrictConfig: it has no target, mode or poison_rate."""

    name = "plain-config-attack"
    Config = PlainConfig
    meta = PluginMeta(summary="test-only malformed attack")

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(-1)


class SecondFinetune(ZeroHead):
    """Claims a built-in's name from an in-process plugin, which loads after every entry point."""

    name = "finetune"


class _Malformed:
    @hookimpl
    def register_attacks(self, register):  # type: ignore[no-untyped-def]
        register(PlainConfigAttack)

    @hookimpl
    def register_purifiers(self, register: Register) -> None:
        register(SecondFinetune)


@pytest.fixture
def malformed() -> Iterator[None]:
    register_plugin(_Malformed(), "test-malformed")
    yield
    unregister_plugin("test-malformed")


def test_malformed_in_process_plugin_is_reported_not_fatal(malformed: None) -> None:
    listing = runner.invoke(app, ["plugins", "--json"])
    assert listing.exit_code == 0, listing.output
    payload = json.loads(listing.stdout)
    errors = [f["error"] for f in payload["failures"] if f["plugin"] == "test-malformed"]
    # the malformed attack leaves the whole plugin out, its well-formed purifier too (so its name
    # clash with the built-in finetune never arises): a plugin is never half-installed
    assert len(errors) == 1
    assert "PlainConfigAttack.Config must subclass AttackConfig" in errors[0]
    rows = {(p["kind"], p["name"]): p for p in payload["plugins"]}
    assert rows[("purifier", "finetune")]["distribution"] == "backdoor-toolkit"
    assert ("attack", "plain-config-attack") not in rows
    assert not [p for p in payload["plugins"] if p["plugin"] == "test-malformed"]
    result = runner.invoke(app, ["benchmark", "--attack", "plain-config-attack"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert message.startswith(
        "Error: attack 'plain-config-attack' is not available: in-process plugin 'test-malformed' failed "
        "to load: PluginError: plugin test-malformed (in-process): PlainConfigAttack.Config must subclass "
        "AttackConfig"
    ), message
    # the built-in finetune is what plain `finetune` selects: its Config has no `scale`
    result = runner.invoke(app, ["benchmark", "--defense", "finetune", "--set", "finetune.scale=0.5"])
    assert result.exit_code == 2 and "scale" in result.output and "Extra inputs" in result.output


class NoDefaultConfig(StrictConfig):
    smoothing: float = Field(ge=0, le=1, description="Label smoothing (no default: malformed)")


class NoDefaultFinetune(ZeroHead):
    name = "no-default-finetune"
    Config = NoDefaultConfig  # type: ignore[assignment]


class WellFormedAttack(PlainConfigAttack):
    name = "well-formed-sibling"
    Config = AttackConfig  # type: ignore[assignment]


class _NoDefault:
    @hookimpl
    def register_attacks(self, register: Register) -> None:
        register(WellFormedAttack)

    @hookimpl
    def register_purifiers(self, register: Register) -> None:
        register(NoDefaultFinetune)


def test_config_field_without_default_leaves_the_whole_plugin_out() -> None:
    """A field without a default once registered, crashed `plugins show` and failed at the first
    run with what read like the user's error; now the plugin fails to load, naming the field, and
    its well-formed attack is left out with it."""
    register_plugin(_NoDefault(), "test-no-default")
    try:
        listing = runner.invoke(app, ["plugins", "--json"])
        payload = json.loads(listing.stdout)
        errors = [f["error"] for f in payload["failures"] if f["plugin"] == "test-no-default"]
        assert len(errors) == 1 and "fields have no default: smoothing" in errors[0], errors
        names = {p["name"] for p in payload["plugins"]}
        assert not names & {"no-default-finetune", "well-formed-sibling"}
        shown = runner.invoke(app, ["plugins", "show", "no-default-finetune"])
        assert shown.exit_code == 2 and "Traceback" not in shown.output
        assert "fields have no default" in " ".join(shown.output.split())
        sibling = runner.invoke(app, ["benchmark", "--attack", "well-formed-sibling"])
        assert sibling.exit_code == 2 and "fields have no default" in " ".join(sibling.output.split())
    finally:
        unregister_plugin("test-no-default")


def test_misspelt_config_field_is_one_line_with_did_you_mean() -> None:
    result = runner.invoke(app, ["benchmark", "--defense", "finetune", "--set", "finetune.epoch=3"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "epoch: Extra inputs are not permitted (did you mean 'epochs'?)" in message, message
    assert message.count("Error:") == 1 and "finetune': epoch:" in message  # one line, not a list


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"seeds": [1, 2, 1]}, "seeds lists 1 more than once"),
        ({"attacks": ["badnets", "sig", "badnets"]}, "attacks lists badnets more than once"),
        (
            {"defenses": ["mcldef:paper", {"name": "mcldef", "preset": "paper"}]},
            "mcldef:paper more than once",
        ),
        ({"seeds": [2**32]}, "less than or equal to 4294967295"),
        ({"clean_ratio": float("nan")}, "finite number"),
    ],
)
def test_config_files_and_suites_refuse_repeats_wrapping_seeds_and_nan(
    values: dict[str, object], message: str
) -> None:
    from backdoor_toolkit.config import BenchmarkConfig, build_config
    from backdoor_toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_config(BenchmarkConfig, values, "a config file")
    # the same config without the repeat is fine: two different configs of one plugin are not repeats
    build_config(BenchmarkConfig, {"defenses": ["mcldef", "mcldef:paper"]}, "a config file")


def test_plugins_show_takes_name_and_preset_as_everywhere_else() -> None:
    shown = runner.invoke(app, ["plugins", "show", "mcldef:paper"])
    assert shown.exit_code == 0 and "mcldef" in shown.output
    wrong = runner.invoke(app, ["plugins", "show", "mcldef:papr"])
    assert wrong.exit_code == 2 and "Did you mean 'paper'?" in " ".join(wrong.output.split())
