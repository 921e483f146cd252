"""Trigger inverters (Neural Cleanse, blend inversion, periodic-signal inversion) and the NC-unlearning
purifier."""

from backdoor_toolkit import hookimpl

from .blend import BlendInversion
from .neural_cleanse import NeuralCleanse
from .periodic import PeriodicInversion
from .unlearning import NCUnlearning


@hookimpl
def register_inverters(register):  # type: ignore[no-untyped-def]
    register(NeuralCleanse)
    register(BlendInversion)
    register(PeriodicInversion)


@hookimpl
def register_purifiers(register):  # type: ignore[no-untyped-def]
    register(NCUnlearning)
