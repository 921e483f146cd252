"""Every hook a bdtk plugin can implement.

A plugin is an import package named by an entry point of group `bdtk`; its top-level module
implements some of these hooks with `@hookimpl` (`from backdoor_toolkit import hookimpl`). Each
hook hands plugin *classes* to a `register` callback owned by the core, which checks the class
(subclass of the right interface, a `name`, a `Config` whose fields are all described and which
subclasses the interface's config base, `AttackConfig` for attacks and `StrictConfig` otherwise, a
`PluginMeta` `meta`), settles duplicate names and records which distribution the class came
from. Instances are created later, per run, from a validated config.

The hooks are called lazily: the first time anything asks for the registry (a lookup such as
`get_purifier("clp")`, `bdtk plugins`, a benchmark), each hook is called once per plugin, in the
order the plugins were loaded: bdtk's own entry points, then the other distributions sorted by
name (then by entry-point name), then plugins registered in-process. Of two classes of one kind
that claim a name, the first in that order keeps it; the other is reported as a load failure and
stays selectable as `DIST/NAME`. A hook implementation whose name matches no hook below (e.g.
`register_attack`) makes its plugin fail to load with an error that names the misspelling.

`docs/reference/hooks.md` is generated from this module by `docs/generate_reference.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("bdtk")
hookimpl = pluggy.HookimplMarker("bdtk")

#: The callback each `register_*` hook receives: call it once per plugin class.
Register = Callable[[type[Any]], None]


@hookspec
def register_attacks(register: Register) -> None:
    """Call `register(cls)` for each `Attack` subclass the plugin provides.

    Arguments:
        register: takes one `Attack` subclass; its `name` must be unique among attacks.

    Called once, when the registry is first needed (the first lookup or listing). An attack is
    then instantiated per run by `create_attack` as `cls(config, spec, seed=seed)`, with `config`
    validated from `cls.Config` and `spec` the dataset's `DataSpec`.
    """


@hookspec
def register_inverters(register: Register) -> None:
    """Call `register(cls)` for each `TriggerInverter` subclass the plugin provides.

    Arguments:
        register: takes one `TriggerInverter` subclass; its `name` must be unique among inverters.

    Called once, when the registry is first needed. Inverters are instantiated by
    `create_inverter` as `cls(config, seed=seed)`; a purifier that needs one builds it by name (or
    `NAME:PRESET`) with `create_inverter`.
    """


@hookspec
def register_purifiers(register: Register) -> None:
    """Call `register(cls)` for each `Purifier` subclass the plugin provides.

    Arguments:
        register: takes one `Purifier` subclass; its `name` must be unique among purifiers. This is
            the name used by `bdtk benchmark --defense NAME`.

    Called once, when the registry is first needed. A purifier is instantiated per benchmark cell
    by `create_purifier` as `cls(config, seed=seed, device=device)` and its `purify(model, data)`
    receives a copy of the backdoored model and the defender's clean budget.
    """


#: The names of every hook above, for error messages and generated docs.
HOOK_NAMES: tuple[str, ...] = tuple(
    sorted(name for name, value in list(globals().items()) if hasattr(value, "bdtk_spec"))
)
