"""The `bdtk` command line; each command lives in its own module and registers on `app`."""

from . import attack, benchmark, inspect, leaderboard, plugins, purify, zoo
from . import importer as importer  # `bdtk import`
from .common import app

__all__ = ["app", "attack", "benchmark", "inspect", "leaderboard", "plugins", "purify", "zoo"]
