"""User-facing errors: one clear sentence for the user, never a deep traceback."""

from __future__ import annotations


class BdtkError(Exception):
    """An error whose message is meant for the user as it stands; the CLI prints it and exits 2."""


class UnknownNameError(BdtkError, KeyError):
    """A name (plugin, dataset, model) that is not registered; the message lists what exists."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"Unknown {kind} {name!r}.{did_you_mean(name, known)}")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


def did_you_mean(name: str, known: list[str]) -> str:
    """The tail shared by every unknown-name message: close matches, then everything that exists."""
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
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


class DatasetNotFoundError(BdtkError):
    """The files of a dataset are missing; the message says how to get them."""


class ModelRequirementError(BdtkError):
    """A plugin needs something (BatchNorm, layer groups, …) that the model does not offer."""


class ConfigError(BdtkError):
    """A configuration that fails validation; the message names each bad field."""

    @classmethod
    def from_validation(cls, where: str, exc: Exception) -> ConfigError:
        from pydantic import ValidationError

        if not isinstance(exc, ValidationError):
            return cls(f"{where}: {exc}")
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {loc}: {err['msg']}")
        return cls(f"Invalid configuration for {where}:\n" + "\n".join(lines))
