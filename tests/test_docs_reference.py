"""docs/reference/*.md are generated from the code; this fails when they are stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generate_reference", ROOT / "docs" / "generate_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_references_are_up_to_date() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in _generator().render().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"{', '.join(stale)} differ from the code: run `python docs/generate_reference.py`."


def test_reference_covers_every_command_and_hook() -> None:
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    hooks = (ROOT / "docs" / "reference" / "hooks.md").read_text()
    for command in ("bdtk benchmark", "bdtk plugins", "bdtk plugins show"):
        assert f"## `{command}`" in cli
    for hook in ("register_attacks", "register_inverters", "register_purifiers"):
        assert f"### `{hook}`" in hooks
    assert "`--kind`" in cli and "Instantiated as `Purifier(config" in hooks
