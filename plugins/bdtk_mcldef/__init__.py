"""MCLDef: model-contrastive backdoor purification, registered through the `bdtk` entry point."""

from backdoor_toolkit import hookimpl

from .mcldef import MCLDef


@hookimpl
def register_purifiers(register):  # type: ignore[no-untyped-def]
    register(MCLDef)
