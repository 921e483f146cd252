"""The core's imports go one way: each module imports only from the layers below its own.

Every import counts, including deferred ones inside functions and those under `TYPE_CHECKING`,
because a cycle hidden in either still ties two modules together. The layer list lives here and is
mirrored, word for word, in docs/architecture.md (checked below), so the docs cannot drift.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "backdoor_toolkit"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "console", "hookspecs"),
    ("config", "output_paths"),
    ("data", "triggers", "artifacts"),
    ("models", "image_folders"),
    ("training", "metrics", "inversion"),
    ("interfaces", "finetuning", "victims"),
    ("plugins",),
    ("backdoor", "suites", "testing", "retuning", "purification", "backdoorbench"),
    ("results",),
    ("cells",),
    ("executors", "store"),
    ("benchmark", "victim_benchmark"),
    ("leaderboard",),
    ("cli",),
]
"""Lowest first. A subpackage (models, leaderboard, testing, cli) is one unit: its modules may
import each other."""


def _unit(module: str) -> str:
    """The layer unit of a dotted module name inside the package ('models.base' → 'models')."""
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """Every in-package module `path` imports, as dotted names relative to the package."""
    relative = path.relative_to(ROOT).with_suffix("")
    package = list(relative.parts[:-1])  # what a relative import of level 1 starts from
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    found.add(".".join([*base, node.module]))
                else:
                    found.update(".".join([*base, alias.name]) for alias in node.names)
            elif node.module and node.module.split(".")[0] == PACKAGE:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    return {name[len(PACKAGE) + 1 :] for name in found if name.startswith(PACKAGE + ".")} | (
        {""} if PACKAGE in found else set()
    )


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        dotted = ".".join(path.relative_to(ROOT / PACKAGE).with_suffix("").parts)
        modules[dotted.removesuffix(".__init__").removesuffix("__init__")] = path
    return modules


LAYER_OF = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}


def test_every_module_has_a_layer() -> None:
    units = {_unit(name) for name in _modules() if name}
    assert units - set(LAYER_OF) == set(), "add new core modules to LAYERS (and docs/architecture.md)"
    assert set(LAYER_OF) - units == set(), "LAYERS names a module that no longer exists"


@pytest.mark.parametrize("module", sorted(name for name in _modules() if name))
def test_imports_go_downward(module: str) -> None:
    unit = _unit(module)
    upward = []
    for target in sorted(_imports(_modules()[module])):
        if target == "":
            upward.append(f"{PACKAGE} (the public facade; import the defining module instead)")
            continue
        other = _unit(target)
        if other != unit and LAYER_OF[other] >= LAYER_OF[unit]:
            upward.append(f"{target} (layer {LAYER_OF[other]}, not below {unit}'s {LAYER_OF[unit]})")
    assert upward == [], f"{module} imports {upward}"


#: Units above the registry that the facade may still export: the user-facing `purify` and
#: `inspect` (`backdoor_toolkit.purify(...)`), which sit below the runner and the store.
FACADE_ENTRY_POINTS = ("purification",)


def test_the_facade_exports_nothing_above_the_registry() -> None:
    """Plugins import only `backdoor_toolkit`; the runner and store stay out of their reach.

    The one exception is `purification`, the user's entry point: it is re-exported so that
    `backdoor_toolkit.purify` works, and it stays below `results` (checked here), so the facade
    still reaches neither the runner nor the store through it.
    """
    for target in _imports(_modules()[""]):
        unit = _unit(target)
        assert LAYER_OF[unit] <= LAYER_OF["plugins"] or unit in FACADE_ENTRY_POINTS, target
    for unit in FACADE_ENTRY_POINTS:
        assert LAYER_OF[unit] < LAYER_OF["results"], f"{unit} must stay below the runner and the store"


def test_docs_state_the_enforced_layers() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    rendered = "\n".join(f"{i:>2}. {', '.join(layer)}" for i, layer in enumerate(LAYERS))
    assert rendered in text, f"docs/architecture.md should list the layers as:\n{rendered}"
