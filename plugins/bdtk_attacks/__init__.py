"""Built-in attacks, registered through the `bdtk` entry point like any third-party plugin."""

from backdoor_toolkit import hookimpl

from .badnets import BadNets


@hookimpl
def register_attacks(register):  # type: ignore[no-untyped-def]
    register(BadNets)
