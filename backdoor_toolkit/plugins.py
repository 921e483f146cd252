"""The plugin manager: loads entry points of group `bdtk`, builds and serves the registry.

Built-in plugins are found through the very same entry-point group as third-party ones.
Loading is lazy and idempotent: the first lookup loads every entry point once, and the registry is
built once from the `register_*` hooks. `BDTK_LOAD_PLUGINS` (comma-separated distribution or
entry-point names) restricts what loads. A plugin that fails to import, implements a hook that
does not exist (a misspelling), or raises while registering is recorded as a `LoadFailure` with its
package and error; everything else keeps working. Two plugins claiming the same name is an error
naming both. Both caches are process-wide; `reset_plugin_manager()` drops them (tests use it after
changing `BDTK_LOAD_PLUGINS` or `sys.path`).

A plugin is chosen as `NAME` or `NAME:PRESET`; `resolve_config` (and `resolve_plugin`,
`create_inverter`) turn that and explicit values into the plugin's validated config, always in
one order: the Config's defaults, then the preset's values, then the explicit values.
"""

from __future__ import annotations

import copy
import difflib
import importlib.metadata as md
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import ValidationError

from . import hookspecs
from .config import PRESET_SEPARATOR, StrictConfig, build_config, join_preset, split_preset
from .errors import BdtkError, ConfigError, UnknownNameError, UnknownPresetError
from .interfaces import Attack, Kind, Plugin, PluginMeta, Preset, Purifier, TriggerInverter

ENTRY_POINT_GROUP = "bdtk"
LOAD_ENV = "BDTK_LOAD_PLUGINS"
IN_PROCESS = "(in-process)"  # the distribution recorded for plugins registered by register_plugin
_BASES: dict[Kind, type[Plugin]] = {
    "attack": Attack,
    "inverter": TriggerInverter,
    "purifier": Purifier,
}
#: Plugin names: lower-case, starting with a letter or digit.
PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
#: Preset names: like plugin names but without dots, since `--set NAME:PRESET.FIELD=VALUE` splits
#: the field off at the first dot.
PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_HOOKS: dict[Kind, str] = {
    "attack": "register_attacks",
    "inverter": "register_inverters",
    "purifier": "register_purifiers",
}


class PluginError(BdtkError):
    """A plugin class or package is malformed (bad metadata, duplicate name, unknown hook, …)."""


@dataclass(frozen=True)
class Source:
    """Where a plugin came from: the pluggy plugin name and its distribution."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        if self.distribution == IN_PROCESS:
            return f"{self.plugin} (in-process)"
        return f"{self.plugin} ({self.distribution} {self.version})"


@dataclass(frozen=True)
class PluginInfo:
    kind: Kind
    name: str
    cls: type[Plugin]
    source: Source

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
            "plugin": self.source.plugin,
            "distribution": self.source.distribution,
            "version": self.source.version,
            "summary": self.cls.meta.summary,
            "presets": list(self.cls.presets),
        }


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be imported or could not register its classes."""

    plugin: str
    distribution: str
    error: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"plugin": self.plugin, "distribution": self.distribution, "error": self.error}


@dataclass
class Registry:
    by_kind: dict[Kind, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in _BASES})
    failures: list[LoadFailure] = field(default_factory=list)

    def all(self) -> list[PluginInfo]:
        return [info for kind in _BASES for info in sorted(self.by_kind[kind].values(), key=_by_name)]

    def named(self, name: str) -> list[PluginInfo]:
        """Every plugin called `name`, of any kind (an attack and a purifier may share a name)."""
        return [info for info in self.all() if info.name == name]


def _by_name(info: PluginInfo) -> str:
    return info.name


_pm: pluggy.PluginManager | None = None
_sources: dict[str, Source] = {}
_load_failures: list[LoadFailure] = []
_registry: Registry | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry points loaded on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("bdtk")
        pm.add_hookspecs(hookspecs)
        _load_entry_points(pm)
        _pm = pm
    return _pm


def reset_plugin_manager() -> None:
    """Forget the plugin manager, the registry and in-process plugins; the next lookup reloads.

    For tests: call it after changing `BDTK_LOAD_PLUGINS` or `sys.path` (e.g. a temporary
    distribution), and again afterwards so the change does not leak into other tests. Modules
    already imported stay in `sys.modules`.
    """
    global _pm, _registry
    _pm = None
    _registry = None
    _sources.clear()
    _load_failures.clear()


def normalize_name(name: str) -> str:
    """Distribution names compare like pip compares them: case- and `-_.`-insensitive."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed() -> set[str] | None:
    value = os.environ.get(LOAD_ENV)
    if value is None:
        return None
    return {normalize_name(part.strip()) for part in value.split(",") if part.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _allowed()
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        if allowed is not None and not {normalize_name(dist), normalize_name(ep.name)} & allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        source = Source(ep.name, dist, version)
        try:
            module = ep.load()
            _register_checked(pm, module, source)
        except Exception as exc:  # a broken plugin must not take the others down
            _load_failures.append(LoadFailure(ep.name, dist, _one_line(exc), traceback.format_exc()))


def _register_checked(pm: pluggy.PluginManager, plugin: object, source: Source) -> None:
    """Register `plugin`, refusing hook implementations that match no hookspec (misspellings)."""
    pm.register(plugin, name=source.plugin)
    unknown = sorted(c.name for c in pm.get_hookcallers(plugin) or [] if c.spec is None)
    if unknown:
        pm.unregister(plugin)
        hints = []
        for hook in unknown:
            close = difflib.get_close_matches(hook, hookspecs.HOOK_NAMES, n=1)
            hints.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise PluginError(
            f"plugin {source} implements unknown hook {', '.join(hints)}; "
            f"bdtk hooks are {', '.join(hookspecs.HOOK_NAMES)}."
        )
    pm.check_pending()
    _sources[source.plugin] = source


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def register_plugin(plugin: object, name: str) -> None:
    """Register an in-process plugin (a module or object with hookimpls), e.g. in tests.

    Raises PluginError at once when it implements a hook that does not exist.
    """
    pm = get_plugin_manager()
    if pm.get_plugin(name) is not None:
        raise PluginError(f"A plugin named {name!r} is already registered ({_sources.get(name)}).")
    _register_checked(pm, plugin, Source(name, IN_PROCESS, ""))
    _invalidate()


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under `name` (no-op when there is none)."""
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    _sources.pop(name, None)
    _invalidate()


def _invalidate() -> None:
    global _registry
    _registry = None


def get_registry() -> Registry:
    """Build (once) the registry of every plugin class, checking each as it registers.

    A plugin's classes enter the registry only when its hook returns without error and every class
    passes the checks; otherwise the plugin is listed under `failures`. A name claimed twice in
    one kind raises PluginError naming both sources.
    """
    global _registry
    if _registry is None:
        pm = get_plugin_manager()
        registry = Registry(failures=list(_load_failures))
        for kind, hook_name in _HOOKS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order
                source = _sources.get(impl.plugin_name, Source(impl.plugin_name, "?", "?"))
                offered: list[type[Any]] = []
                try:
                    impl.function(register=offered.append)
                    for cls in offered:
                        check_plugin_class(cls, kind, source)
                except Exception as exc:  # a broken plugin must not take the others down
                    registry.failures.append(
                        LoadFailure(
                            source.plugin, source.distribution, _one_line(exc), traceback.format_exc()
                        )
                    )
                    continue
                for cls in offered:
                    _add(registry, kind, cls, source)
        _registry = registry
    return _registry


def _add(registry: Registry, kind: Kind, cls: type[Plugin], source: Source) -> None:
    table = registry.by_kind[kind]
    if cls.name in table:
        other = table[cls.name]
        raise PluginError(
            f"Duplicate {kind} name {cls.name!r}: registered by {other.source} "
            f"({other.cls.__module__}.{other.cls.__qualname__}) and by {source} "
            f"({cls.__module__}.{cls.__qualname__}). Rename one, or restrict loading "
            f"with {LOAD_ENV}."
        )
    table[cls.name] = PluginInfo(kind, cls.name, cls, source)


def check_plugin_class(cls: Any, kind: Kind, source: Source | str = "") -> None:
    """Raise PluginError unless `cls` is a well-formed `kind` plugin class (name, Config, meta, presets)."""
    base = _BASES[kind]
    where = f"plugin {source}" if source else "plugin"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(
            f"{where} registered {cls!r} as a {kind}, but it is not a {base.__name__} subclass."
        )
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not PLUGIN_NAME.fullmatch(name):
        raise PluginError(
            f"{where}: {cls.__qualname__}.name must be a lower-case name like 'my-defense', got {name!r}."
        )
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, StrictConfig)):
        raise PluginError(f"{where}: {cls.__qualname__}.Config must subclass StrictConfig.")
    if not isinstance(getattr(cls, "meta", None), PluginMeta):
        raise PluginError(f"{where}: {cls.__qualname__}.meta must be a PluginMeta.")
    undocumented = [f for f, info in cls.Config.model_fields.items() if not info.description]
    if undocumented:
        raise PluginError(
            f"{where}: {cls.__qualname__}.Config fields lack a description: {', '.join(undocumented)}."
        )
    _check_presets(cls, where)


def _check_presets(cls: type[Plugin], where: str) -> None:
    """Presets must be named like plugins and validate against the Config: a broken preset is the
    plugin author's error, reported when the plugin loads rather than when a user first picks it."""
    presets = getattr(cls, "presets", None)
    owner = cls.__qualname__
    if not isinstance(presets, dict):
        raise PluginError(
            f"{where}: {owner}.presets must be a dict of preset name → Preset, got {type(presets).__name__}."
        )
    for key, preset in presets.items():
        if not isinstance(key, str) or not PRESET_NAME.fullmatch(key):
            raise PluginError(
                f"{where}: {owner}.presets: {key!r} is not a lower-case preset name like 'paper' "
                "(letters, digits, '-' and '_')."
            )
        if not isinstance(preset, Preset):
            raise PluginError(
                f"{where}: {owner}.presets[{key!r}] must be a Preset(values=..., description=...), "
                f"got {type(preset).__name__}."
            )
        if "\n" in preset.description.strip() or not preset.description.strip():
            raise PluginError(f"{where}: {owner}.presets[{key!r}].description must be one non-empty line.")
        try:
            cls.Config.model_validate(copy.deepcopy(preset.values))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
            )
            raise PluginError(
                f"{where}: {owner}.presets[{key!r}] does not validate against {owner}.Config: {problems}."
            ) from None


def get_plugin(kind: Kind, name: str) -> PluginInfo:
    """Look a plugin up by kind and name; an unknown name lists those that exist.

    A `NAME:PRESET` is refused with a pointer to `resolve_config`: a lookup by name alone would
    silently drop the preset.
    """
    table = get_registry().by_kind[kind]
    if name not in table:
        base, sep, _ = name.partition(PRESET_SEPARATOR)
        if sep and base in table:
            raise BdtkError(
                f"{kind} {name!r} selects a preset of {base!r}; resolve it with "
                f"resolve_config({kind!r}, {name!r})"
                + (f" or create_inverter({name!r})" if kind == "inverter" else "")
                + ", not with a lookup by name alone."
            )
        raise UnknownNameError(kind, name, sorted(table))
    return table[name]


def get_preset(kind: Kind, name: str, preset: str) -> Preset:
    """A plugin's preset; an unknown one answers "did you mean" and lists the plugin's presets."""
    presets = get_plugin(kind, name).cls.presets
    if preset not in presets:
        raise UnknownPresetError(kind, name, preset, list(presets))
    return presets[preset]


@dataclass(frozen=True)
class ResolvedPlugin:
    """A registered plugin with its validated config and the preset that config started from."""

    info: PluginInfo
    config: StrictConfig
    preset: str | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def label(self) -> str:
        """`NAME` or `NAME:PRESET`: how results and leaderboards name this choice."""
        return join_preset(self.info.name, self.preset)


def resolve_plugin(
    kind: Kind,
    name: str,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    where: str | None = None,
) -> ResolvedPlugin:
    """The plugin `name` (or `NAME:PRESET`) with its config: defaults ⊕ preset ⊕ `overrides`.

    Explicit values win over the preset's, field by field, so `--set mcldef.epochs=3` still
    applies to `mcldef:paper`. Errors (unknown plugin or preset, a bad value) are one-line
    BdtkErrors naming `where` (default: the kind and `NAME:PRESET`).
    """
    base, named = split_preset(name)
    if named is not None and preset is not None and named != preset:
        raise ConfigError(f"{kind} {name!r} names preset {named!r}, but preset {preset!r} was also given.")
    chosen = preset if preset is not None else named
    info = get_plugin(kind, base)
    values: dict[str, Any] = {}
    if chosen is not None:
        values = copy.deepcopy(get_preset(kind, base, chosen).values)
    values.update(overrides or {})
    config = build_config(info.cls.Config, values, where or f"{kind} {join_preset(base, chosen)!r}")
    return ResolvedPlugin(info, config, chosen)


def resolve_config(
    kind: Kind,
    name: str,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    where: str | None = None,
) -> StrictConfig:
    """A plugin's validated config: its defaults ⊕ the preset's values ⊕ `overrides`.

    `name` may carry the preset (`"mcldef:paper"`) instead of `preset`. See `resolve_plugin`.
    """
    return resolve_plugin(kind, name, preset, overrides, where=where).config


def create_inverter(
    choice: str, config: Mapping[str, Any] | None = None, *, seed: int = 0, where: str | None = None
) -> TriggerInverter:
    """An inverter chosen by `NAME` or `NAME:PRESET` (e.g. a purifier's `inverter` field), with
    `config` over the preset's values.

    The one place where a plugin's config names another plugin, so that every purifier that runs
    an inverter accepts the same syntax and resolves it in the same order.
    """
    resolved = resolve_plugin("inverter", choice, overrides=config, where=where)
    cls = resolved.info.cls
    assert issubclass(cls, TriggerInverter)
    return cls(resolved.config, seed=seed)


def find_plugins(name: str) -> list[PluginInfo]:
    """Every plugin called `name` across kinds; an unknown name answers "did you mean"."""
    registry = get_registry()
    matches = registry.named(name)
    if not matches:
        raise UnknownNameError("plugin", name, sorted({info.name for info in registry.all()}))
    return matches


def get_attack(name: str) -> type[Attack]:
    cls = get_plugin("attack", name).cls
    assert issubclass(cls, Attack)
    return cls


def get_inverter(name: str) -> type[TriggerInverter]:
    cls = get_plugin("inverter", name).cls
    assert issubclass(cls, TriggerInverter)
    return cls


def get_purifier(name: str) -> type[Purifier]:
    cls = get_plugin("purifier", name).cls
    assert issubclass(cls, Purifier)
    return cls
