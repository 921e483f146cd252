"""Plugin loading end to end: entry points, the example third-party package, broken packages,
BDTK_LOAD_PLUGINS and BDTK_DISABLE_PLUGINS, misspelt hooks, duplicate names (`DIST/NAME`), names of
plugins that failed to load, configs of the wrong base, and `bdtk plugins [show]`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor
from typer.testing import CliRunner

from backdoor_toolkit import (
    Attack,
    DefenseData,
    ImageClassifier,
    PluginMeta,
    PurificationResult,
    Purifier,
    hookimpl,
)
from backdoor_toolkit.cli import app
from backdoor_toolkit.data import DEBIAN_FASHION_MNIST
from backdoor_toolkit.plugins import (
    PluginError,
    check_plugin_class,
    get_plugin,
    get_plugin_manager,
    get_registry,
    register_plugin,
    reset_plugin_manager,
    unregister_plugin,
)
from backdoor_toolkit.testing import ConformanceError

runner = CliRunner()


def bdtk(*args: str) -> Any:
    return runner.invoke(app, list(args))


def listing() -> dict[str, Any]:
    result = bdtk("plugins", "--json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def make_distribution(root: Path, dist: str, module: str, source: str, entry_point: str = "") -> None:
    """A minimal installed distribution on `root`: dist-info with a `bdtk` entry point (named
    `entry_point`, by default like the module), and its module."""
    info = root / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[bdtk]\n{entry_point or module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


def one_error(result: Any) -> str:
    """The CLI's single error message (exit 2, no traceback), with rich's wrapping undone."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("Error: ") and "\nError: " not in result.output, result.output
    return " ".join(result.output.split())


BROKEN_IMPORT = """
raise ImportError("this plugin needs a package that is not installed")
"""

RAISING_HOOK = """
from backdoor_toolkit import hookimpl

@hookimpl
def register_purifiers(register):
    raise RuntimeError("registration exploded")
"""

MISSPELT_HOOK = """
from backdoor_toolkit import hookimpl

@hookimpl
def register_attack(register):
    pass
"""

CLASHING = """
from torch import Tensor

from backdoor_toolkit import Attack, DefenseData, PluginMeta, PurificationResult, Purifier, hookimpl

class OtherCLP(Purifier):
    name = "clp"
    meta = PluginMeta(summary="a second purifier that also calls itself clp")

    def purify(self, model, data):
        return PurificationResult(model=model, modified=False)

@hookimpl
def register_purifiers(register):
    register(OtherCLP)
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bdtk_isolated_plugins: None) -> Path:
    """A temporary site directory on sys.path, seen by a fresh plugin manager."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_example_plugin_is_listed_with_its_distribution() -> None:
    plugins = {(p["kind"], p["name"]): p for p in listing()["plugins"]}
    clp = plugins[("purifier", "clp")]
    assert clp["distribution"] == "bdtk-clp" and clp["version"] == "0.1.0"
    assert clp["class"] == "bdtk_clp.clp.CLP"
    assert plugins[("attack", "badnets")]["distribution"] == "backdoor-toolkit"
    table = bdtk("plugins")
    assert table.exit_code == 0 and "clp" in table.stdout and "bdtk-clp" in table.stdout
    # tables in load order: bdtk's own first, then by distribution name (the order settling clashes)
    assert table.stdout.index("backdoor-toolkit 0.1.0") < table.stdout.index("bdtk-clp 0.1.0")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_benchmark_with_the_example_defense_produces_a_row(tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps({"model": "small-cnn", "train_size": 400, "test_size": 200, "training": {"epochs": 1}})
    )
    out = tmp_path / "results.json"
    # the cache is the test session's private one (conftest), shared with other tiny benchmarks
    result = bdtk(
        "benchmark", "--defense", "clp", "--config", str(config), "--output", str(out), "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    rows = {row["defense"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"none", "clp"}
    clp = rows["clp"]
    assert clp["status"] == "ok", clp["error"]
    assert 0 <= clp["ba"] <= 1 and 0 <= clp["asr"] <= 1 and clp["der"] is not None
    assert clp["diagnostics"]["total_channels"] == 32 + 64 + 128  # small-cnn's three conv+BN layers
    assert clp["provenance"]["defense_plugin"] == "bdtk-clp 0.1.0"


def test_broken_packages_are_reported_and_the_rest_keeps_working(site: Path) -> None:
    make_distribution(site, "bdtk-broken-import", "broken_import_plugin", BROKEN_IMPORT)
    make_distribution(site, "bdtk-raising-hook", "raising_hook_plugin", RAISING_HOOK)
    make_distribution(site, "bdtk-misspelt", "misspelt_plugin", MISSPELT_HOOK)
    payload = listing()
    failures = {f["distribution"]: f for f in payload["failures"]}
    assert set(failures) == {"bdtk-broken-import", "bdtk-raising-hook", "bdtk-misspelt"}
    assert failures["bdtk-broken-import"]["error"] == (
        "ImportError: this plugin needs a package that is not installed"
    )
    assert failures["bdtk-raising-hook"]["error"] == "RuntimeError: registration exploded"
    assert "'register_attack' (did you mean 'register_attacks'?)" in failures["bdtk-misspelt"]["error"]
    names = {p["name"] for p in payload["plugins"]}
    assert {"clp", "badnets", "finetune"} <= names
    assert get_plugin("purifier", "clp").source.distribution == "bdtk-clp"
    table = bdtk("plugins")
    assert table.exit_code == 0
    assert "Failed to load plugin raising_hook_plugin (bdtk-raising-hook)" in table.output


def test_load_plugins_env_restricts_loading(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_distribution(site, "bdtk-broken-import", "broken_import_plugin", BROKEN_IMPORT)
    monkeypatch.setenv("BDTK_LOAD_PLUGINS", "bdtk_CLP")  # names compare like pip's
    payload = listing()
    assert [(p["kind"], p["name"]) for p in payload["plugins"]] == [("purifier", "clp")]
    assert payload["failures"] == []
    reset_plugin_manager()
    monkeypatch.setenv("BDTK_LOAD_PLUGINS", "backdoor-toolkit, bdtk-broken-import")
    payload = listing()
    assert "clp" not in {p["name"] for p in payload["plugins"]}
    assert "badnets" in {p["name"] for p in payload["plugins"]}
    assert [f["distribution"] for f in payload["failures"]] == ["bdtk-broken-import"]


def test_duplicate_names_fail_naming_both_sources(site: Path) -> None:
    make_distribution(site, "bdtk-other-clp", "other_clp_plugin", CLASHING)
    result = bdtk("plugins")
    assert result.exit_code == 0, result.output
    message = " ".join(result.output.split())
    assert "Name clash in plugin other_clp_plugin (bdtk-other-clp): Duplicate purifier name 'clp'" in message
    assert "bdtk-clp 0.1.0" in message and "bdtk-other-clp 0.0.1" in message
    assert "bdtk_clp.clp.CLP" in message and "other_clp_plugin.OtherCLP" in message
    assert "'bdtk-clp/clp' or 'bdtk-other-clp/clp'" in message
    assert get_plugin("purifier", "clp").cls.__module__ == "bdtk_clp.clp"  # "bdtk-clp" < "bdtk-other-clp"


class Throwaway(Purifier):
    name = "throwaway"
    meta = PluginMeta(summary="does nothing")

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        return PurificationResult(model=model, modified=False)


def test_register_fixture_adds_a_plugin_for_one_test(bdtk_register: Any) -> None:
    name = bdtk_register(Throwaway)
    info = get_plugin("purifier", "throwaway")
    assert info.cls is Throwaway and info.source.distribution == "(in-process)"
    unregister_plugin(name)
    assert "throwaway" not in get_registry().by_kind["purifier"]


def test_register_fixture_surfaces_a_malformed_class(bdtk_register: Any) -> None:
    class Nameless(Throwaway):
        name = "Bad Name"

    with pytest.raises(AssertionError, match="lower-case name"):
        bdtk_register(Nameless)


def test_in_process_duplicate_names_both(bdtk_register: Any) -> None:
    class Clash(Throwaway):
        name = "clp"

    with pytest.raises(
        ConformanceError,
        match=r"'clp': bdtk_clp\.clp\.CLP of clp \(bdtk-clp 0\.1\.0\) has it, so .*Clash of "
        r"test-clp \(in-process\) is left out; rename one\.",
    ):
        bdtk_register(Clash)
    assert get_plugin("purifier", "clp").source.distribution == "bdtk-clp"


def test_misspelt_hookimpl_fails_loudly_in_process() -> None:
    class Typo:
        @hookimpl
        def register_purifier(self, register: Any) -> None:
            register(Throwaway)

    with pytest.raises(PluginError, match="'register_purifier' \\(did you mean 'register_purifiers'\\?\\)"):
        register_plugin(Typo(), "typo")
    assert get_plugin_manager().get_plugin("typo") is None


class ThrowawayPlugin:
    @hookimpl
    def register_purifiers(self, register: Any) -> None:
        register(Throwaway)


def test_reset_forgets_in_process_plugins(bdtk_isolated_plugins: None) -> None:
    register_plugin(ThrowawayPlugin(), "p")
    assert "throwaway" in get_registry().by_kind["purifier"]
    reset_plugin_manager()
    assert "throwaway" not in get_registry().by_kind["purifier"]
    assert "clp" in get_registry().by_kind["purifier"]


def test_show_prints_metadata_fields_and_schema() -> None:
    result = bdtk("plugins", "show", "clp")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "purifier clp" in text and "Data-Free Backdoor Removal Based on Channel Lipschitzness" in text
    assert "u float = 3.0 (≥ 0.0, ≤ 20.0)" in text  # the field's type, default and bounds
    assert "--json" in text  # where the JSON schema is
    payload = json.loads(bdtk("plugins", "show", "clp", "--json").stdout)
    assert payload[0]["config_schema"]["additionalProperties"] is False
    assert payload[0]["config_schema"]["properties"]["u"]["maximum"] == 20.0
    assert [p["kind"] for p in payload] == ["purifier"]
    assert payload[0]["meta"]["year"] == 2022 and payload[0]["meta"]["requires"] == ["batchnorm"]
    assert payload[0]["config_schema"]["properties"]["u"]["default"] == 3.0


def test_show_a_name_shared_by_two_kinds(bdtk_register: Any) -> None:
    class SharedAttack(Attack):
        name = "clp"
        meta = PluginMeta(summary="an attack that shares its name with a purifier")

        def apply_trigger(self, images: Tensor) -> Tensor:
            return images.flip(-1)

    bdtk_register(SharedAttack)
    payload = json.loads(bdtk("plugins", "show", "clp", "--json").stdout)
    assert sorted(p["kind"] for p in payload) == ["attack", "purifier"]
    only = json.loads(bdtk("plugins", "show", "clp", "--kind", "purifier", "--json").stdout)
    assert [p["class"] for p in only] == ["bdtk_clp.clp.CLP"]
    both = bdtk("plugins", "show", "clp")
    assert "attack clp" in both.stdout and "purifier clp" in both.stdout


def test_show_unknown_name_suggests() -> None:
    result = bdtk("plugins", "show", "clpp")
    assert result.exit_code == 2
    assert "Unknown plugin 'clpp'. Did you mean 'clp'?" in " ".join(result.output.split())


# --- a name whose plugin failed to load ---------------------------------------------------------


def test_name_of_a_plugin_that_failed_to_import_says_why(site: Path) -> None:
    make_distribution(site, "bdtk-mydefense", "mydefense", BROKEN_IMPORT)
    why = (
        "distribution 'bdtk-mydefense' failed to load: "
        "ImportError: this plugin needs a package that is not installed"
    )
    message = one_error(bdtk("benchmark", "-d", "mydefense"))
    assert f"Error: purifier 'mydefense' is not available: {why}" in message
    assert "Unknown" not in message
    # with a preset, through `plugins show`, and as DIST/NAME: the same reason
    assert f"purifier 'mydefense' is not available: {why}" in one_error(
        bdtk("benchmark", "-d", "mydefense:paper")
    )
    assert f"plugin 'mydefense' is not available: {why}" in one_error(bdtk("plugins", "show", "mydefense"))
    qualified = one_error(bdtk("plugins", "show", "bdtk-mydefense/anything"))
    assert f"plugin 'bdtk-mydefense/anything' is not available: {why}" in qualified


def test_unattributable_unknown_name_counts_failed_distributions(site: Path) -> None:
    make_distribution(site, "bdtk-broken-import", "broken_import_plugin", BROKEN_IMPORT)
    make_distribution(site, "bdtk-raising-hook", "raising_hook_plugin", RAISING_HOOK)
    message = one_error(bdtk("benchmark", "--defense", "fine-tune"))
    assert "Unknown purifier 'fine-tune'. Did you mean 'finetune'" in message
    assert "Note: 2 plugin distributions failed to load (see `bdtk plugins`)." in message
    shown = one_error(bdtk("plugins", "show", "nosuch"))
    assert "Unknown plugin 'nosuch'." in shown and "2 plugin distributions failed to load" in shown


def test_no_note_when_nothing_failed() -> None:
    message = one_error(bdtk("benchmark", "--defense", "fine-tune"))
    assert "Did you mean 'finetune'" in message and "Note:" not in message


# --- duplicate names ----------------------------------------------------------------------------

# "aaa-finetune" sorts before "backdoor-toolkit": the built-ins still load first and keep the name
OTHER_FINETUNE = """
from typing import ClassVar

from pydantic import Field

from backdoor_toolkit import PluginMeta, Preset, PurificationResult, Purifier, StrictConfig, hookimpl


class OtherConfig(StrictConfig):
    strength: float = Field(default=0.5, ge=0.0, le=1.0, description="How hard to tune")


class OtherFinetune(Purifier):
    name = "finetune"
    Config = OtherConfig
    meta = PluginMeta(summary="a third-party purifier that also calls itself finetune")
    presets: ClassVar = {"fast": Preset(values={"strength": 0.1}, description="Gentle and quick")}

    def purify(self, model, data):
        return PurificationResult(model=model, modified=False, notes="the other finetune")


class Extra(Purifier):
    name = "extra-defense"
    meta = PluginMeta(summary="a purifier whose name is free")

    def purify(self, model, data):
        return PurificationResult(model=model, modified=False)


@hookimpl
def register_purifiers(register):
    register(OtherFinetune)
    register(Extra)
"""


def test_a_clash_with_a_builtin_keeps_the_builtin_and_everything_works(site: Path) -> None:
    make_distribution(site, "aaa-finetune", "aaa_finetune_plugin", OTHER_FINETUNE)
    result = bdtk("plugins", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    plugins = {(p["kind"], p["name"]): p for p in payload["plugins"]}
    assert plugins[("purifier", "finetune")]["distribution"] == "backdoor-toolkit"
    assert plugins[("purifier", "extra-defense")]["distribution"] == "aaa-finetune"
    assert {"badnets", "clp", "mcldef"} <= {name for _, name in plugins}
    [clash] = payload["failures"]
    assert clash["plugin"] == "aaa_finetune_plugin" and clash["distribution"] == "aaa-finetune"
    assert clash["error"].startswith("Duplicate purifier name 'finetune': bdtk_baselines.")
    assert "of baselines (backdoor-toolkit " in clash["error"]
    assert (
        "aaa_finetune_plugin.OtherFinetune of aaa_finetune_plugin (aaa-finetune 0.0.1) is left out"
        in (clash["error"])
    )
    assert "select one as 'backdoor-toolkit/finetune' or 'aaa-finetune/finetune'" in clash["error"]
    table = bdtk("plugins")
    assert table.exit_code == 0
    assert "Name clash in plugin aaa_finetune_plugin (aaa-finetune): Duplicate purifier name" in " ".join(
        table.output.split()
    )
    # DIST/NAME picks either one
    [builtin] = json.loads(bdtk("plugins", "show", "backdoor-toolkit/finetune", "--json").stdout)
    assert builtin["class"].startswith("bdtk_baselines.")
    [other] = json.loads(bdtk("plugins", "show", "AAA_Finetune/finetune", "--json").stdout)
    assert other["class"] == "aaa_finetune_plugin.OtherFinetune" and other["distribution"] == "aaa-finetune"
    [plain] = json.loads(bdtk("plugins", "show", "finetune", "--kind", "purifier", "--json").stdout)
    assert plain["class"] == builtin["class"]
    unknown = one_error(bdtk("plugins", "show", "aaa-finetune/finetun"))
    assert "Unknown plugin 'aaa-finetune/finetun'. Did you mean 'aaa-finetune/finetune'" in unknown


def test_dist_name_combines_with_presets_and_set_on_the_cli_and_in_toml(site: Path, tmp_path: Path) -> None:
    make_distribution(site, "aaa-finetune", "aaa_finetune_plugin", OTHER_FINETUNE)
    # the preset and the field exist only in the third-party class: reaching them proves the choice
    bad = one_error(
        bdtk("benchmark", "-d", "aaa-finetune/finetune:fast", "--set", "aaa-finetune/finetune.strength=5")
    )
    assert "Invalid configuration for purifier 'aaa-finetune/finetune:fast'" in bad
    assert "strength: Input should be less than or equal to 1" in bad
    builtin = one_error(bdtk("benchmark", "-d", "backdoor-toolkit/finetune:fast"))
    assert "Unknown preset 'fast' of purifier 'backdoor-toolkit/finetune'" in builtin
    suite = tmp_path / "suite.toml"
    suite.write_text(
        'defenses = [{ name = "aaa-finetune/finetune:fast", config = { strength = 2 } }]\n'
        'attacks = ["backdoor-toolkit/badnets"]\n'
    )
    from_toml = one_error(bdtk("benchmark", "--config", str(suite)))
    assert "purifier 'aaa-finetune/finetune:fast'" in from_toml and "strength" in from_toml


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_benchmark_runs_the_plugin_that_lost_the_clash_by_dist_name(site: Path, tmp_path: Path) -> None:
    make_distribution(site, "aaa-finetune", "aaa_finetune_plugin", OTHER_FINETUNE)
    config = tmp_path / "tiny.toml"
    config.write_text(
        'model = "small-cnn"\ntrain_size = 400\ntest_size = 200\n'
        'defenses = ["aaa-finetune/finetune:fast"]\n[training]\nepochs = 1\n'
    )
    out = tmp_path / "results.json"
    result = bdtk("benchmark", "--config", str(config), "--output", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    [row] = [r for r in rows if r["defense"] != "none"]
    assert row["status"] == "ok" and row["notes"] == "the other finetune"
    assert row["defense"] == "finetune" and row["defense_preset"] == "fast"
    assert row["provenance"]["defense_plugin"] == "aaa-finetune 0.0.1"


def test_an_entry_point_name_taken_by_another_distribution_still_loads(site: Path) -> None:
    # the built-in distribution has an entry point called `baselines` too
    make_distribution(site, "bdtk-extra", "extra_plugin", OTHER_FINETUNE, entry_point="baselines")
    payload = listing()
    plugins = {(p["kind"], p["name"]): p for p in payload["plugins"]}
    assert plugins[("purifier", "extra-defense")]["plugin"] == "baselines"
    assert plugins[("purifier", "extra-defense")]["distribution"] == "bdtk-extra"
    assert plugins[("purifier", "finetune")]["distribution"] == "backdoor-toolkit"
    assert [f["distribution"] for f in payload["failures"]] == ["bdtk-extra"]


# --- BDTK_DISABLE_PLUGINS ---------------------------------------------------------------------


def test_disable_plugins_env_turns_a_distribution_off(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_distribution(site, "aaa-finetune", "aaa_finetune_plugin", OTHER_FINETUNE)
    monkeypatch.setenv("BDTK_DISABLE_PLUGINS", "AAA_finetune, bdtk-clp")  # names compare like pip's
    payload = listing()
    names = {p["name"] for p in payload["plugins"]}
    assert "extra-defense" not in names and "clp" not in names and {"finetune", "badnets"} <= names
    assert payload["failures"] == []  # the clash is gone with the distribution
    assert sorted((s["distribution"], s["reason"]) for s in payload["skipped"]) == [
        ("aaa-finetune", "disabled by BDTK_DISABLE_PLUGINS"),
        ("bdtk-clp", "disabled by BDTK_DISABLE_PLUGINS"),
    ]
    table = bdtk("plugins")
    assert table.exit_code == 0
    assert table.output.rstrip().splitlines()[-1] == (
        "Not loaded, disabled by BDTK_DISABLE_PLUGINS: aaa-finetune 0.0.1, bdtk-clp 0.1.0"
    )
    message = one_error(bdtk("benchmark", "-d", "clp"))
    assert (
        "Error: purifier 'clp' is not available: distribution 'bdtk-clp' is disabled by BDTK_DISABLE_PLUGINS."
        in message
    )
    shown = one_error(bdtk("plugins", "show", "aaa-finetune/finetune"))
    assert "plugin 'aaa-finetune/finetune' is not available: distribution 'aaa-finetune' is disabled" in shown
    unknown = one_error(bdtk("benchmark", "-d", "nosuch"))
    assert (
        "Note: 2 plugin distributions are disabled by BDTK_DISABLE_PLUGINS (see `bdtk plugins`)." in unknown
    )


def test_a_name_in_the_plugin_env_vars_that_matches_nothing_is_said(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in BDTK_DISABLE_PLUGINS leaves the plugin on, one in BDTK_LOAD_PLUGINS loads nothing:
    both say which name matched no installed plugin."""
    monkeypatch.setenv("BDTK_DISABLE_PLUGINS", "bdtk-clpp")
    table = bdtk("plugins")
    assert table.exit_code == 0
    assert "BDTK_DISABLE_PLUGINS names 'bdtk-clpp', which no installed plugin" in " ".join(
        table.output.split()
    )
    monkeypatch.delenv("BDTK_DISABLE_PLUGINS")
    monkeypatch.setenv("BDTK_LOAD_PLUGINS", "nosuch")
    reset_plugin_manager()  # the environment is read when the plugins load
    message = one_error(bdtk("benchmark", "-a", "badnets"))
    assert "BDTK_LOAD_PLUGINS names 'nosuch', which no installed plugin" in message


def test_disabling_the_builtins_lets_the_third_party_name_win(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_distribution(site, "aaa-finetune", "aaa_finetune_plugin", OTHER_FINETUNE)
    monkeypatch.setenv("BDTK_DISABLE_PLUGINS", "backdoor-toolkit")
    payload = listing()
    plugins = {(p["kind"], p["name"]): p for p in payload["plugins"]}
    assert plugins[("purifier", "finetune")]["distribution"] == "aaa-finetune"
    assert ("attack", "badnets") not in plugins and payload["failures"] == []


def test_load_plugins_env_names_the_missing_distribution(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDTK_LOAD_PLUGINS", "backdoor-toolkit")
    message = one_error(bdtk("benchmark", "-d", "clp"))
    assert (
        "purifier 'clp' is not available: distribution 'bdtk-clp' is not listed in BDTK_LOAD_PLUGINS."
        in message
    )
    assert "Not loaded, not listed in BDTK_LOAD_PLUGINS: bdtk-clp 0.1.0" in bdtk("plugins").output


# --- configs of the wrong base ------------------------------------------------------------------

PLAIN_CONFIG_ATTACK = """
from pydantic import Field

from backdoor_toolkit import Attack, PluginMeta, StrictConfig, hookimpl


class PlainConfig(StrictConfig):
    size: int = Field(default=3, ge=1, le=8, description="Patch size")


class PlainAttack(Attack):
    name = "plain-attack"
    Config = PlainConfig
    meta = PluginMeta(summary="an attack whose config lacks target, mode and poison_rate")

    def apply_trigger(self, images):
        return images.flip(-1)


@hookimpl
def register_attacks(register):
    register(PlainAttack)
"""


def test_attack_with_a_plain_strict_config_is_refused_at_registration(site: Path) -> None:
    make_distribution(site, "bdtk-plain-attack", "plain_attack_plugin", PLAIN_CONFIG_ATTACK)
    result = bdtk("plugins", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert "plain-attack" not in {p["name"] for p in payload["plugins"]}
    [failure] = payload["failures"]
    assert failure["distribution"] == "bdtk-plain-attack"
    assert (
        "PlainAttack.Config must subclass AttackConfig (it holds the fields every attack needs: "
        "target, mode, poison_rate), got PlainConfig." in failure["error"]
    )
    # the class's name is known, so asking for it says why it is missing instead of "unknown"
    message = one_error(bdtk("benchmark", "--attack", "plain-attack"))
    assert (
        "Error: attack 'plain-attack' is not available: distribution 'bdtk-plain-attack' failed to load: "
        "PluginError: plugin plain_attack_plugin (bdtk-plain-attack 0.0.1): PlainAttack.Config must "
        "subclass AttackConfig"
    ) in message


def test_each_kind_needs_its_interfaces_config_base() -> None:
    from pydantic import BaseModel

    from backdoor_toolkit import StrictConfig, TriggerInverter

    class Loose(BaseModel):
        pass

    class Plain(StrictConfig):
        pass

    class LooseInverter(TriggerInverter):
        name = "loose"
        Config = Loose  # type: ignore[assignment]
        meta = PluginMeta(summary="s")

    class LoosePurifier(Throwaway):
        Config = Loose  # type: ignore[assignment]

    class PlainPurifier(Throwaway):
        Config = Plain

    with pytest.raises(PluginError, match=r"LooseInverter\.Config must subclass StrictConfig, got Loose\."):
        check_plugin_class(LooseInverter, "inverter")
    with pytest.raises(PluginError, match=r"LoosePurifier\.Config must subclass StrictConfig, got Loose\."):
        check_plugin_class(LoosePurifier, "purifier")
    check_plugin_class(PlainPurifier, "purifier")  # StrictConfig is the purifiers' (and inverters') base


def test_a_purifier_may_not_take_the_baselines_name(bdtk_register: Any) -> None:
    class NoneDefense(Throwaway):
        name = "none"

    with pytest.raises(ConformanceError, match=r"NoneDefense\.name 'none' is reserved for purifiers"):
        bdtk_register(NoneDefense)
    payload = listing()
    assert "none" not in {p["name"] for p in payload["plugins"]} and payload["failures"] == []
