"""Named benchmark suites: TOML files holding a grid, validated against the benchmark schema.

A suite is a BenchmarkConfig plus a description. The built-in ones (`quick`, `paper`) ship as
package data in backdoor_toolkit/suites/; any other path to a TOML file works the same way.
Errors name the bad field and its line in the file, since that is where the user has to look.
"""

from __future__ import annotations

import re
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from .config import BenchmarkConfig, read_text_file, validation_problems
from .errors import BdtkError, ConfigError, UnknownNameError
from .interfaces import Kind
from .plugins import resolve_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Suite(BenchmarkConfig):
    """A suite file: every BenchmarkConfig field, plus what the suite is for."""

    description: str = Field(default="", max_length=500, description="What the suite measures")

    @model_validator(mode="after")
    def _one_way_to_name(self) -> Suite:
        for one, many in (("dataset", "datasets"), ("model", "models")):
            if one in self.model_fields_set and getattr(self, many):
                raise ValueError(f"give either `{one}` or `{many}`, not both")
        return self

    def benchmark_values(self) -> dict[str, Any]:
        """The fields the file set, as BenchmarkConfig values (so CLI flags can still override)."""
        return self.model_dump(include=self.model_fields_set - {"description"})


def available_suites() -> list[str]:
    folder = files("backdoor_toolkit") / "suites"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _suite_text(name_or_path: str) -> tuple[str, str]:
    """The suite's (source label, TOML text): a built-in name, or a path to a TOML file."""
    if not name_or_path.strip():
        raise ConfigError(
            f"--suite is empty; give a suite name ({', '.join(available_suites())}) or a TOML file."
        )
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return str(path), read_text_file(path, "Suite file")
    if name_or_path not in available_suites():
        raise UnknownNameError("suite", name_or_path, available_suites())
    resource = files("backdoor_toolkit") / "suites" / f"{name_or_path}.toml"
    return f"suite {name_or_path!r}", resource.read_text()


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.\-\"']+)\s*=")


def field_line(text: str, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the TOML key (or table) closest to a pydantic error location.

    Tables (`[training]`), arrays of tables (`[[attacks]]`, counted) and dotted keys are followed;
    the longest prefix of `loc` that some line defines wins.
    """
    table: list[int | str] = []
    counts: dict[tuple[int | str, ...], int] = {}
    best, best_len = None, 0
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            path: list[int | str] = [p.strip().strip("\"'") for p in header.group(2).split(".")]
            if header.group(1) == "[[":
                key = tuple(path)
                counts[key] = counts.get(key, -1) + 1
                path.append(counts[key])
            table = path
        else:
            key_match = _KEY.match(line)
            if not key_match:
                continue
            path = [*table, *(p.strip("\"'") for p in key_match.group(1).split("."))]
        common = 0
        for have, want in zip(path, loc, strict=False):
            if str(have) != str(want):
                break
            common += 1
        if common == len(path) and common > best_len:  # the line defines a prefix of loc
            best, best_len = number, common
    return best


def load_suite(name_or_path: str) -> Suite:
    """Parse and validate a suite; errors name each bad field with its line."""
    source, text = _suite_text(name_or_path)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"Cannot parse {source}: {exc}") from None
    try:
        # strict: TOML has types, so a quoted number or a boolean where a number belongs is a
        # mistake to report, not a value to convert (`seeds = [true, "1"]` would be seed 1 twice)
        suite = Suite.model_validate(data, strict=True)
    except ValidationError as exc:
        problems = []
        for loc, message in validation_problems(Suite, exc):
            where = ".".join(str(p) for p in loc) or "(root)"
            line = field_line(text, loc)
            at = f" (line {line})" if line else ""
            problems.append(f"{where}{at}: {message}")
        raise ConfigError(f"Invalid {source}: " + "; ".join(problems)) from None
    if not suite.benchmark_values():
        # an empty file would otherwise run the full default grid: hours nobody asked for
        raise ConfigError(f"{source} sets nothing; a suite names at least its attacks and defenses.")
    _check_plugins(suite, source, text)
    return suite


def _check_plugins(suite: Suite, source: str, text: str) -> None:
    """Resolve every attack and defense now, so a misspelt plugin, preset or setting is reported
    with the file and the line to fix, not later as a bare plugin error."""
    sections: tuple[tuple[str, Kind], ...] = (("attacks", "attack"), ("defenses", "purifier"))
    for section, kind in sections:
        for index, choice in enumerate(getattr(suite, section)):
            try:
                resolve_config(kind, choice.name, choice.preset, choice.config)
            except BdtkError as exc:
                message = str(exc)
                loc: tuple[int | str, ...] = (section, index)
                for key in choice.config:
                    # validation_message writes each problem as `FIELD: ...` after ': ' or '; '
                    if re.search(rf"(?:: |; ){re.escape(str(key))}[:.]", message):
                        loc = (section, index, "config", key)
                        break
                line = field_line(text, loc)
                at = f" (line {line})" if line else ""
                raise ConfigError(
                    f"Invalid {source}, {section}[{index}] {choice.spec!r}{at}: {message}"
                ) from None
