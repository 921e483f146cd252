"""`bdtk plugins`: what is registered, where it came from, and each plugin's config schema."""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape

from ..config import split_preset
from ..console import console
from ..plugins import (
    BUILTIN_DISTRIBUTION,
    PluginInfo,
    find_plugins,
    get_plugin,
    get_preset,
    get_registry,
    normalize_name,
)
from .common import app, user_errors
from .listing import listing_table

plugins_app = typer.Typer(help="List registered plugins, or show one with `plugins show NAME`.")
app.add_typer(plugins_app, name="plugins")

#: Listings are the command's result, so they go to stdout (progress and errors go to stderr).
out = Console(highlight=False)


@plugins_app.callback(invoke_without_command=True)
@user_errors
def plugins(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (stable)")] = False,
) -> None:
    """List plugins: kind, name, distribution, version; plugins that failed to load or lost a name
    clash; distributions left unloaded by BDTK_DISABLE_PLUGINS or BDTK_LOAD_PLUGINS."""
    if ctx.invoked_subcommand is not None:
        return
    registry = get_registry()
    if as_json:
        payload = {
            "plugins": [info.as_dict() for info in registry.all()],
            "failures": [f.as_dict() for f in registry.failures],
            "skipped": [s.as_dict() for s in registry.skipped],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    # one table per distribution: where a plugin comes from is its table's title, which leaves the
    # row's width to the names a user types and to the summary
    by_distribution: dict[tuple[str, str], list[PluginInfo]] = {}
    for info in registry.all():
        by_distribution.setdefault((info.source.distribution, info.source.version), []).append(info)

    # in the order the registry loads distributions (bdtk's own, then by name), which settles
    # name clashes
    def load_order(item: tuple[tuple[str, str], list[PluginInfo]]) -> tuple[bool, str]:
        name = normalize_name(item[0][0])
        return (name != BUILTIN_DISTRIBUTION, name)

    for (distribution, version), infos in sorted(by_distribution.items(), key=load_order):
        table = listing_table(
            f"{distribution} {version}", names=("kind", "name", "presets"), prose=("summary",)
        )
        for info in infos:
            table.add_row(info.kind, info.name, ", ".join(info.cls.presets), escape(info.cls.meta.summary))
        out.print(table)
    for failure in registry.failures:
        what = "Name clash in" if failure.clash else "Failed to load"
        console.print(
            f"[red]{what} plugin {failure.plugin} ({failure.distribution}): {escape(failure.error)}[/]",
            highlight=False,
        )
    # one line per reason, so a distribution turned off is visible next to the listing
    reasons: dict[str, list[str]] = {}
    for skipped in registry.skipped:
        entry = f"{skipped.distribution} {skipped.version}"
        if entry not in reasons.setdefault(skipped.reason, []):
            reasons[skipped.reason].append(entry)
    for reason, entries in reasons.items():
        console.print(f"[yellow]Not loaded, {reason}: {', '.join(entries)}[/]", highlight=False)
    for line in registry.unmatched:
        console.print(f"[yellow]{escape(line)}[/]", highlight=False)


def describe(info: PluginInfo) -> dict[str, Any]:
    """Everything `plugins show` prints: where the plugin comes from, its metadata, its presets
    (name → description and values) and its config's schema."""
    return {
        **info.as_dict(),
        "meta": info.cls.meta.model_dump(mode="json"),
        "presets": {name: preset.model_dump(mode="json") for name, preset in info.cls.presets.items()},
        "config_schema": info.cls.Config.model_json_schema(),
    }


def _constraints(field: FieldInfo) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "len ≥", "max_length": "len ≤"}
    parts = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _type_name(field: FieldInfo) -> str:
    return type_name(field.annotation)


def type_name(annotation: Any) -> str:
    """A config field's type as a user writes it: `str | list[str]`, `one of: a, b`, `int`.

    Pydantic's own repr of an annotated union runs to several hundred characters of FieldInfo.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is Literal:
        return "one of: " + ", ".join(str(arg) for arg in args)
    if origin is not None:
        inner = ", ".join(type_name(arg) for arg in args)
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{inner}]" if inner else base
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _print_plugin(info: PluginInfo) -> None:
    meta = info.cls.meta
    out.print(f"[bold]{info.kind} {info.name}[/]  ({info.source.distribution} {info.source.version})")
    rows = {
        "summary": meta.summary,
        "paper": meta.paper,
        "year": "" if meta.year is None else str(meta.year),
        "url": meta.url,
        "threat model": meta.threat_model,
        "requires": ", ".join(c.value for c in meta.requires),
        "presets": ", ".join(info.cls.presets) or "none",
        "class": info.as_dict()["class"],
    }
    for key, value in rows.items():
        if value:
            out.print(f"  {key + ':':14} {value}")
    fields = info.cls.Config.model_fields
    if fields:
        table = listing_table(
            f"{info.name} config (set with --set {info.name}.FIELD=VALUE)",
            names=("field",),
            prose=("type = default (bounds), description",),
        )
        for name, field in fields.items():
            # type, default and bounds on one dim line above the description: four narrow columns
            # would each fold to a few characters on an 80-column terminal
            default = field.get_default(call_default_factory=True)
            signature = f"{_type_name(field)} = {json.dumps(default, default=str)}"
            if constraints := _constraints(field):
                signature += f"  ({constraints})"
            table.add_row(name, f"[dim]{escape(signature)}[/]\n{escape(field.description or '')}")
        out.print(table)
    presets = info.cls.presets
    if presets:
        flag = {"attack": "--attack", "purifier": "--defense"}.get(info.kind)
        how = f"with {flag} {info.name}:PRESET" if flag else f"as {info.name}:PRESET"
        table = listing_table(
            f"{info.name} presets (choose one {how}; explicit values win over a preset's)",
            names=("preset",),
            prose=("description", "values"),
        )
        for name, preset in presets.items():
            values = "\n".join(f"{k}={json.dumps(v)}" for k, v in preset.values.items())
            table.add_row(f"{info.name}:{name}", escape(preset.description), escape(values))
        out.print(table)
    # the JSON schema's one-line strings would overrun any terminal; tools ask for it with --json
    out.print(f"Config JSON schema: bdtk plugins show {info.name} --kind {info.kind} --json")


@plugins_app.command("show")
@user_errors
def plugins_show(
    name: Annotated[
        str,
        typer.Argument(
            help="Plugin name, or DIST/NAME for one distribution's; NAME:PRESET checks the preset"
        ),
    ],
    kind: Annotated[
        Literal["attack", "inverter", "purifier"] | None,
        typer.Option(help="Only the plugin of this kind (when a name is shared by several kinds)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output: a list (stable)")] = False,
) -> None:
    """Print a plugin's metadata, config fields and presets (every kind using NAME, unless --kind);
    --json adds the config's JSON schema."""
    name, preset = split_preset(name)  # NAME:PRESET, as everywhere else: the plugin, its preset checked
    matches = [get_plugin(kind, name)] if kind else find_plugins(name)
    if preset is not None:
        for info in matches:
            get_preset(info.kind, info.qualified_name, preset)  # unknown: "did you mean" and the list
    if as_json:
        typer.echo(json.dumps([describe(info) for info in matches], indent=2))
        return
    for i, info in enumerate(matches):
        if i:
            out.print()
        _print_plugin(info)
