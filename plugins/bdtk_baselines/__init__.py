"""Built-in baseline defenses, registered through the `bdtk` entry point."""

from backdoor_toolkit import hookimpl

from .finetune import FineTuning


@hookimpl
def register_purifiers(register):  # type: ignore[no-untyped-def]
    register(FineTuning)
