"""User-facing errors: one clear sentence for the user, never a deep traceback."""

from __future__ import annotations


class BdtkError(Exception):
    """An error whose message is meant for the user as it stands; the CLI prints it and exits 2."""


class UnknownNameError(BdtkError, KeyError):
    """A name (plugin, dataset, model) that is not registered; the message lists what exists."""

    def __init__(self, kind: str, name: str, known: list[str], note: str = "") -> None:
        """`note` is appended as it stands: e.g. that some plugin distributions failed to load,
        which may be why `name` is unknown."""
        message = f"Unknown {kind} {shown_name(name)}.{did_you_mean(name, known)}"
        super().__init__(f"{message} {note}" if note else message)
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


#: Past this many characters a name a user typed is cut in messages: a 100,000-character name
#: echoed whole buries the one line that says what exists.
SHOWN_NAME_CHARS = 80


def shown_name(name: str) -> str:
    """`name` quoted for a one-line message: newlines and other control characters escaped (repr),
    cut to SHOWN_NAME_CHARS."""
    if len(name) > SHOWN_NAME_CHARS:
        return f"{name[:SHOWN_NAME_CHARS]!r}… ({len(name):,} characters)"
    return repr(name)


def did_you_mean(name: str, known: list[str]) -> str:
    """The tail shared by every unknown-name message: close matches, then everything that exists."""
    import difflib

    # long names match nothing, and difflib's cost grows with the product of the lengths
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) if len(name) <= 200 else []
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    available = ", ".join(sorted(known)) or "none"
    return f"{hint} Available: {available}."


class UnknownPresetError(UnknownNameError):
    """A preset the plugin does not declare; the message names the plugin and lists its presets.

    A subclass of UnknownNameError, so callers that already turn unknown names into one line
    (the CLI, suite validation) treat a misspelt `NAME:PRESET` the same way.
    """

    def __init__(self, kind: str, plugin: str, preset: str, known: list[str]) -> None:
        where = f"Unknown preset {preset!r} of {kind} {plugin!r}"
        tail = f".{did_you_mean(preset, known)}" if known else f": {plugin} has no presets."
        BdtkError.__init__(self, where + tail)
        self.kind, self.name, self.known, self.plugin = "preset", preset, known, plugin


class PluginUnavailableError(UnknownNameError):
    """A plugin name that belongs to a distribution which failed to load or is turned off.

    "Unknown" would send the user hunting for a typo; this says which distribution the name
    belongs to and why it is missing. A subclass of UnknownNameError, so callers that already
    turn unknown names into one line treat it the same way.
    """

    def __init__(self, kind: str, name: str, reason: str) -> None:
        BdtkError.__init__(self, f"{kind} {name!r} is not available: {reason}")
        self.kind, self.name, self.known = kind, name, []


class DatasetNotFoundError(BdtkError):
    """The files of a dataset are missing; the message says how to get them."""


class ModelRequirementError(BdtkError):
    """A plugin needs something (BatchNorm, layer groups, …) that the model does not offer."""


class ConfigError(BdtkError):
    """A configuration that fails validation; the message names each bad field."""


class NonFiniteError(BdtkError):
    """A loss or a weight became NaN or infinite: that stage stops, and its cell fails.

    A diverged model still predicts something (usually one class), so without this check it
    would be scored, stored as `ok` and ranked; a NaN is an error, never a result.
    """


class DatasetCorruptError(BdtkError):
    """A dataset's files are there but damaged or of the wrong shape; the message names the file."""
