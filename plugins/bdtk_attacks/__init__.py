"""Built-in attacks, registered through the `bdtk` entry point like any third-party plugin."""

from backdoor_toolkit import hookimpl

from .badnets import BadNets
from .blended import Blended
from .input_aware import InputAware
from .sig import SIG
from .trojan import Trojan
from .wanet import WaNet


@hookimpl
def register_attacks(register):  # type: ignore[no-untyped-def]
    for attack in (BadNets, Blended, Trojan, SIG, WaNet, InputAware):
        register(attack)
