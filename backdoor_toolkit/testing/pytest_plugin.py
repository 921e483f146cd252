"""The pytest plugin (entry point `pytest11`): the conformance kit's fixtures in every pytest run.

bdtk registers this module with pytest wherever bdtk is installed, so a plugin's tests get these
fixtures with no import and no conftest. It is kept apart from the checks so that they stay usable
from other test runners, which should not have to import pytest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ..data import DataSpec, DefenseData, ImageData
from ..hookspecs import hookimpl
from ..interfaces import Attack, Plugin, Purifier, TriggerInverter
from ..models import ImageClassifier
from ..plugins import get_registry, register_plugin, reset_plugin_manager, unregister_plugin
from .checks import ConformanceError
from .inputs import TINY_SPEC, tiny_defense_data, tiny_images, tiny_model


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bdtk-device", default="cpu", help="Device for bdtk conformance fixtures and checks (cpu, cuda, …)"
    )


@pytest.fixture
def bdtk_device(request: pytest.FixtureRequest) -> torch.device:
    """The device from `--bdtk-device` (default cpu); a missing GPU skips the test."""
    device = torch.device(request.config.getoption("--bdtk-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bdtk-device cuda, but CUDA is not available")
    return device


@pytest.fixture
def bdtk_spec() -> DataSpec:
    return TINY_SPEC


@pytest.fixture
def bdtk_images() -> ImageData:
    return tiny_images()


@pytest.fixture
def bdtk_defense_data() -> DefenseData:
    return tiny_defense_data()


@pytest.fixture
def bdtk_model(bdtk_device: torch.device) -> ImageClassifier:
    return tiny_model(TINY_SPEC, bdtk_device)


class _Throwaway:
    """Hands a fixed list of classes to whichever `register_*` hook fits each."""

    def __init__(self, classes: tuple[type[Plugin], ...]) -> None:
        self.classes = classes

    def _of(self, base: type[Plugin], register: Callable[[type[Any]], None]) -> None:
        for cls in self.classes:
            if issubclass(cls, base):
                register(cls)

    @hookimpl
    def register_attacks(self, register: Callable[[type[Any]], None]) -> None:
        self._of(Attack, register)

    @hookimpl
    def register_inverters(self, register: Callable[[type[Any]], None]) -> None:
        self._of(TriggerInverter, register)

    @hookimpl
    def register_purifiers(self, register: Callable[[type[Any]], None]) -> None:
        self._of(Purifier, register)


@pytest.fixture
def bdtk_register() -> Iterator[Callable[..., str]]:
    """`bdtk_register(*classes, name=None)` or `bdtk_register(plugin_object, name=...)`.

    Registers plugin classes (or a module/object with `@hookimpl` functions) for this test only,
    and returns the plugin's name. A class that fails the registry's checks fails the test at once.
    """
    names: list[str] = []

    def register(*items: Any, name: str | None = None) -> str:
        if items and all(isinstance(i, type) and issubclass(i, Plugin) for i in items):
            plugin: object = _Throwaway(tuple(items))
            name = name or "test-" + "-".join(i.name for i in items)
        elif len(items) == 1 and name:
            plugin = items[0]
        else:
            raise TypeError("bdtk_register takes plugin classes, or one hookimpl object and name=...")
        register_plugin(plugin, name)
        try:  # a clash or a malformed class is the test's failure, not the next test's
            failures = [f for f in get_registry().failures if f.plugin == name]
            if failures:
                raise ConformanceError(f"plugin {name!r} failed to register: {failures[0].error}")
        except BaseException:
            unregister_plugin(name)
            raise
        names.append(name)
        return name

    yield register
    for name in reversed(names):
        unregister_plugin(name)


@pytest.fixture
def bdtk_isolated_plugins() -> Iterator[None]:
    """Reset the process-wide plugin manager before and after the test.

    The next lookup reloads entry points, so a test can first change `BDTK_LOAD_PLUGINS` (with
    monkeypatch) or put a temporary distribution on `sys.path`.
    """
    reset_plugin_manager()
    yield
    reset_plugin_manager()
