"""`bdtk plugins`: what is registered, where it came from, and each plugin's config schema."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..console import console
from ..plugins import get_plugin, get_registry
from .common import app, user_errors

plugins_app = typer.Typer(help="List registered plugins, or show one with `plugins show NAME`.")
app.add_typer(plugins_app, name="plugins")


@plugins_app.callback(invoke_without_command=True)
@user_errors
def plugins(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (stable)")] = False,
) -> None:
    """List plugins: kind, name, distribution, version; and plugins that failed to load."""
    if ctx.invoked_subcommand is not None:
        return
    registry = get_registry()
    if as_json:
        payload = {
            "plugins": [info.as_dict() for info in registry.all()],
            "failures": [
                {"plugin": f.plugin, "distribution": f.distribution, "error": f.error}
                for f in registry.failures
            ],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    table = Table(title="bdtk plugins")
    for col in ("kind", "name", "distribution", "version", "summary"):
        table.add_column(col)
    for info in registry.all():
        table.add_row(
            info.kind, info.name, info.source.distribution, info.source.version, info.cls.meta.summary
        )
    console.print(table)
    for failure in registry.failures:
        console.print(
            f"[red]Failed to load plugin {failure.plugin} ({failure.distribution}): {failure.error}[/]"
        )


@plugins_app.command("show")
@user_errors
def plugins_show(name: Annotated[str, typer.Argument(help="Plugin name")]) -> None:
    """Print a plugin's metadata and its config's JSON schema."""
    matches = [info for info in get_registry().all() if info.name == name]
    if not matches:
        get_plugin("purifier", name)  # raises the "did you mean" error
    for info in matches:
        payload = {
            **info.as_dict(),
            "meta": info.cls.meta.model_dump(mode="json"),
            "config_schema": info.cls.Config.model_json_schema(),
        }
        typer.echo(json.dumps(payload, indent=2))
