"""Conformance kit for plugin authors: checks of the plugin interface contract and pytest fixtures.

Three parts, one module each, so that a plugin's tests need pytest only if they use its fixtures:

- `inputs`: tiny inputs (`TINY_SPEC`, a 4-class 1×16×16 dataset; `tiny_images`,
  `tiny_defense_data`, `tiny_settings`, `tiny_model`, a barely-trained `small-cnn`).
- `checks`: `check_attack`, `check_inverter`, `check_purifier`, `check_plugin` (dispatch on the
  class's kind) and `check_config`; they raise `ConformanceError` (an AssertionError) naming the
  broken rule, in any test runner.
- `pytest_plugin`: installed as a pytest plugin (entry point `pytest11`), so wherever bdtk is
  installed its fixtures are available in any test without an import:

  - `bdtk_register(*classes)`: register throwaway plugin classes (or a module/object with
    hookimpls) for one test; they are unregistered afterwards.
  - `bdtk_isolated_plugins`: a fresh plugin manager for one test (after changing
    `BDTK_LOAD_PLUGINS` or `sys.path`), and another one afterwards so nothing leaks.
  - `bdtk_spec`, `bdtk_device`, `bdtk_model`, `bdtk_images`, `bdtk_defense_data`: the tiny inputs.
    `pytest --bdtk-device cuda` runs them (and the checks, through `bdtk_device`) on a GPU.

Import the checks and inputs from `backdoor_toolkit.testing`; this package does not import pytest.
"""

from __future__ import annotations

from .checks import (
    CHECKS,
    ConformanceError,
    check_attack,
    check_config,
    check_distribution,
    check_inverter,
    check_plugin,
    check_purifier,
)
from .inputs import TINY_SIZE, TINY_SPEC, tiny_defense_data, tiny_images, tiny_model, tiny_settings

__all__ = [
    "CHECKS",
    "TINY_SIZE",
    "TINY_SPEC",
    "ConformanceError",
    "check_attack",
    "check_config",
    "check_distribution",
    "check_inverter",
    "check_plugin",
    "check_purifier",
    "tiny_defense_data",
    "tiny_images",
    "tiny_model",
    "tiny_settings",
]
