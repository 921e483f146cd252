"""Every hook a bdtk plugin can implement.

Each hook hands plugin *classes* to a `register` callback owned by the core, which checks the
class, detects duplicate names and records where it came from. Implement them with
`from backdoor_toolkit import hookimpl`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("bdtk")
hookimpl = pluggy.HookimplMarker("bdtk")

Register = Callable[[type[Any]], None]


@hookspec
def register_attacks(register: Register) -> None:
    """Call `register(cls)` for each `Attack` subclass the plugin provides.

    Called once, when the registry is first needed (lazily, on the first lookup or listing).
    """


@hookspec
def register_inverters(register: Register) -> None:
    """Call `register(cls)` for each `TriggerInverter` subclass the plugin provides.

    Called once, when the registry is first needed. Purifiers look inverters up by name.
    """


@hookspec
def register_purifiers(register: Register) -> None:
    """Call `register(cls)` for each `Purifier` subclass the plugin provides.

    Called once, when the registry is first needed.
    """
