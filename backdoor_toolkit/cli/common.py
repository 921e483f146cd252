"""What every `bdtk` command shares: the typer app and turning bdtk errors into messages."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ..console import console
from ..errors import BdtkError, ConfigError

app = typer.Typer(
    help="bdtk: attack, inspect and purify backdoored image classifiers; benchmark defenses.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn bdtk's own errors into one red message and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BdtkError as exc:
            console.print(f"[bold red]Error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, booleans, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(items: list[str], attack: str | None = None) -> dict[str, Any]:
    """`--set FIELD=VALUE` (or `ATTACK.FIELD=VALUE`, as `bdtk benchmark` spells it) as a dict.

    With `attack` given as `NAME:PRESET`, both `NAME.FIELD` and `NAME:PRESET.FIELD` are accepted,
    as `bdtk benchmark` accepts them.
    """
    prefixes = [] if not attack else [f"{attack}.", f"{attack.partition(':')[0]}."]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key.removeprefix(prefix)
                break
        if not sep or not key:
            raise ConfigError(f"--set expects FIELD=VALUE (e.g. alpha=0.1), got {item!r}.")
        out[key] = parse_value(raw)
    return out
