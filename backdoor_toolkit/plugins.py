"""The plugin manager: loads entry points of group `bdtk`, builds and serves the registry.

Built-in plugins are found through the very same entry-point group as third-party ones.
Loading is lazy and idempotent. `BDTK_LOAD_PLUGINS` (comma-separated distribution or entry-point
names) restricts what loads. A plugin that fails to import or to register is recorded with its
package and error, and everything else keeps working.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .config import StrictConfig
from .errors import BdtkError, UnknownNameError
from .interfaces import Attack, Kind, Plugin, PluginMeta, Purifier, TriggerInverter

ENTRY_POINT_GROUP = "bdtk"
_BASES: dict[Kind, type[Plugin]] = {
    "attack": Attack,
    "inverter": TriggerInverter,
    "purifier": Purifier,
}
_HOOKS: dict[Kind, str] = {
    "attack": "register_attacks",
    "inverter": "register_inverters",
    "purifier": "register_purifiers",
}


class PluginError(BdtkError):
    """A plugin class or package is malformed (bad metadata, duplicate name, …)."""


@dataclass(frozen=True)
class Source:
    """Where a plugin came from: the pluggy plugin name and its distribution."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
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
        }


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be imported or could not register its classes."""

    plugin: str
    distribution: str
    error: str
    detail: str


@dataclass
class Registry:
    by_kind: dict[Kind, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in _BASES})
    failures: list[LoadFailure] = field(default_factory=list)

    def all(self) -> list[PluginInfo]:
        return [info for kind in _BASES for info in sorted(self.by_kind[kind].values(), key=_by_name)]


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
        pm.check_pending()
        _pm = pm
    return _pm


def _allowed() -> set[str] | None:
    value = os.environ.get("BDTK_LOAD_PLUGINS")
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _allowed()
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        if allowed is not None and dist not in allowed and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            _load_failures.append(LoadFailure(ep.name, dist, _one_line(exc), traceback.format_exc()))
            continue
        _sources[ep.name] = Source(ep.name, dist, version)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def register_plugin(plugin: ModuleType | object, name: str) -> None:
    """Register an in-process plugin (a module or object with hookimpls), e.g. in tests."""
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    pm.check_pending()
    _sources[name] = Source(name, "(in-process)", "")
    _invalidate()


def unregister_plugin(name: str) -> None:
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
    """Build (once) the registry of every plugin class, checking each as it registers."""
    global _registry
    if _registry is None:
        pm = get_plugin_manager()
        registry = Registry(failures=list(_load_failures))
        for kind, hook_name in _HOOKS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                source = _sources.get(impl.plugin_name, Source(impl.plugin_name, "?", "?"))
                try:
                    impl.function(register=_registrar(registry, kind, source))
                except PluginError:
                    raise
                except Exception as exc:
                    registry.failures.append(
                        LoadFailure(
                            source.plugin, source.distribution, _one_line(exc), traceback.format_exc()
                        )
                    )
        _registry = registry
    return _registry


def _registrar(registry: Registry, kind: Kind, source: Source) -> hookspecs.Register:
    def register(cls: type[Any]) -> None:
        _check_plugin_class(cls, kind, source)
        table = registry.by_kind[kind]
        if cls.name in table:
            other = table[cls.name]
            raise PluginError(
                f"Duplicate {kind} name {cls.name!r}: registered by {other.source} "
                f"({other.cls.__module__}.{other.cls.__qualname__}) and by {source} "
                f"({cls.__module__}.{cls.__qualname__}). Rename one, or restrict loading "
                f"with BDTK_LOAD_PLUGINS."
            )
        table[cls.name] = PluginInfo(kind, cls.name, cls, source)

    return register


def _check_plugin_class(cls: Any, kind: Kind, source: Source) -> None:
    base = _BASES[kind]
    where = f"plugin {source}"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(
            f"{where} registered {cls!r} as a {kind}, but it is not a {base.__name__} subclass."
        )
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where}: {cls.__qualname__} needs a non-empty string `name`.")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, StrictConfig)):
        raise PluginError(f"{where}: {cls.__qualname__}.Config must subclass StrictConfig.")
    if not isinstance(getattr(cls, "meta", None), PluginMeta):
        raise PluginError(f"{where}: {cls.__qualname__}.meta must be a PluginMeta.")
    undocumented = [f for f, info in cls.Config.model_fields.items() if not info.description]
    if undocumented:
        raise PluginError(
            f"{where}: {cls.__qualname__}.Config fields lack a description: {', '.join(undocumented)}."
        )


def get_plugin(kind: Kind, name: str) -> PluginInfo:
    """Look a plugin up by kind and name; an unknown name lists those that exist."""
    table = get_registry().by_kind[kind]
    if name not in table:
        raise UnknownNameError(kind, name, sorted(table))
    return table[name]


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
