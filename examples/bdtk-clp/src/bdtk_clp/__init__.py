"""bdtk-clp: the CLP defense as a third-party bdtk plugin (found through the `bdtk` entry point)."""

from backdoor_toolkit import hookimpl

from .clp import CLP, CLPConfig, channel_lipschitz_bounds

__all__ = ["CLP", "CLPConfig", "channel_lipschitz_bounds"]


@hookimpl
def register_purifiers(register):  # type: ignore[no-untyped-def]
    register(CLP)
