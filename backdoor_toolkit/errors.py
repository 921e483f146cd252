"""User-facing errors: one clear sentence for the user, never a deep traceback."""

from __future__ import annotations


class BdtkError(Exception):
    """An error whose message is meant for the user as it stands; the CLI prints it and exits 2."""


class UnknownNameError(BdtkError, KeyError):
    """A name (plugin, dataset, model) that is not registered; the message lists what exists."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        import difflib

        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        available = ", ".join(sorted(known)) or "none"
        super().__init__(f"Unknown {kind} {name!r}.{hint} Available: {available}.")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


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
