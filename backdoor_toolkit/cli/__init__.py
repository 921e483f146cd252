"""The `bdtk` command line; each command lives in its own module and registers on `app`."""

from . import benchmark, plugins, zoo
from .common import app

__all__ = ["app", "benchmark", "plugins", "zoo"]
