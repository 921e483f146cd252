"""Built-in baseline defenses, registered through the `bdtk` entry point."""

from backdoor_toolkit import hookimpl

from .anp import ANP
from .fine_pruning import FinePruning
from .finetune import FineTuning
from .fst import FST
from .ibau import IBAU
from .nad import NAD
from .sau import SAU


@hookimpl
def register_purifiers(register):  # type: ignore[no-untyped-def]
    for cls in (FineTuning, FinePruning, NAD, ANP):
        register(cls)
    register(SAU)
    register(IBAU)
    register(FST)
