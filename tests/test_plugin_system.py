"""Plugin loading end to end: entry points, the example third-party package, broken packages,
BDTK_LOAD_PLUGINS, misspelt hooks, duplicate names and `bdtk plugins [show]`."""

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
    get_plugin,
    get_plugin_manager,
    get_registry,
    register_plugin,
    reset_plugin_manager,
    unregister_plugin,
)

runner = CliRunner()


def bdtk(*args: str) -> Any:
    return runner.invoke(app, list(args))


def listing() -> dict[str, Any]:
    result = bdtk("plugins", "--json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def make_distribution(root: Path, dist: str, module: str, source: str) -> None:
    """A minimal installed distribution on `root`: dist-info with a `bdtk` entry point, and its module."""
    info = root / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[bdtk]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


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
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "Duplicate purifier name 'clp'" in message
    assert "bdtk-clp 0.1.0" in message and "bdtk-other-clp 0.0.1" in message
    assert "bdtk_clp.clp.CLP" in message and "other_clp_plugin.OtherCLP" in message


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
        PluginError, match=r"'clp': registered by clp \(bdtk-clp 0\.1\.0\).*by test-clp \(in-process\)"
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


def test_show_prints_metadata_and_schema() -> None:
    result = bdtk("plugins", "show", "clp")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "purifier clp" in text and "Data-Free Backdoor Removal Based on Channel Lipschitzness" in text
    assert '"additionalProperties": false' in text and '"maximum": 20.0' in text
    payload = json.loads(bdtk("plugins", "show", "clp", "--json").stdout)
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
