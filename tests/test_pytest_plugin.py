"""The conformance kit's pytest plugin works as a plugin author meets it: installed, not imported.

A throwaway test file runs in an in-process pytest (`pytester`), with no conftest and no import
of the fixtures, so it only passes if the `pytest11` entry point in pyproject.toml names the module
that defines them. Running it again with that entry point blocked shows where they came from.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

PLUGIN_AUTHORS_TEST = """
from pydantic import Field

from backdoor_toolkit import PluginMeta, PurificationResult, Purifier, StrictConfig
from backdoor_toolkit.plugins import get_plugin, get_registry
from backdoor_toolkit.testing import check_plugin


class IdentityConfig(StrictConfig):
    steps: int = Field(default=1, ge=1, le=10, description="Steps (unused)")


class Identity(Purifier):
    name = "pytester-identity"
    Config = IdentityConfig
    meta = PluginMeta(summary="returns the model as it is")

    def purify(self, model, data):
        return PurificationResult(model=model, modified=False)


def test_registered_plugin_conforms(bdtk_register, bdtk_device):
    bdtk_register(Identity)
    info = get_plugin("purifier", "pytester-identity")
    assert info.cls is Identity
    check_plugin(info.cls, device=bdtk_device)


def test_the_plugin_is_gone_afterwards():
    assert "pytester-identity" not in get_registry().by_kind["purifier"]
"""


@pytest.fixture
def plugin_authors_test(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)  # entry points must load
    pytester.makepyfile(test_my_plugin=PLUGIN_AUTHORS_TEST)
    return pytester


def test_entry_point_names_the_fixture_module() -> None:
    (point,) = [p for p in entry_points(group="pytest11") if p.name == "bdtk"]
    assert point.value == "backdoor_toolkit.testing.pytest_plugin"
    assert callable(getattr(point.load(), "bdtk_register", None))


def test_fixtures_and_checks_work_in_a_plugin_authors_test(plugin_authors_test: pytest.Pytester) -> None:
    result = plugin_authors_test.runpytest_inprocess("-p", "no:cacheprovider", "--bdtk-device", "cpu")
    result.assert_outcomes(passed=2)


def test_without_the_entry_point_the_fixtures_are_missing(plugin_authors_test: pytest.Pytester) -> None:
    result = plugin_authors_test.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:bdtk")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'bdtk_register' not found*"])
