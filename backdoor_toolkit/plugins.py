"""The plugin manager: loads entry points of group `bdtk`, builds and serves the registry.

Built-in plugins are found through the very same entry-point group as third-party ones.
Loading is lazy and idempotent: the first lookup loads every entry point once, and the registry is
built once from the `register_*` hooks. `BDTK_LOAD_PLUGINS` (comma-separated distribution or
entry-point names) restricts what loads; `BDTK_DISABLE_PLUGINS` (same spelling) turns some off.
A plugin that fails to import, implements a hook that does not exist (a misspelling), or raises
while registering is recorded as a `LoadFailure` with its package and error; everything else keeps
working, and a lookup of a name that plugin was meant to provide says so instead of "unknown".
Both caches are process-wide; `reset_plugin_manager()` drops them (tests use it after changing
`BDTK_LOAD_PLUGINS` or `sys.path`).

Load order is deterministic, because it decides who keeps a name that two plugins claim: bdtk's own
entry points first, then the other distributions by (normalised) name, then entry-point name, then
in-process plugins in the order they were registered. The first class to claim a name keeps it; a
later one is left out of plain-name lookups and reported as a `LoadFailure` naming both, but stays
reachable as `DIST/NAME` (e.g. `bdtk-clp/clp`).

A plugin is chosen as `NAME`, `DIST/NAME`, or either with `:PRESET`; `resolve_config` (and
`resolve_plugin`) turn that and explicit values into the plugin's validated config, always in one
order: the Config's defaults, then the preset's values, then the explicit values. The factories
`create_attack`, `create_inverter` and `create_purifier` resolve a choice the same way (or take a
`ResolvedPlugin`) and return a typed instance, so no caller looks a class up and instantiates it by
hand.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.metadata as md
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from pydantic import ValidationError

from . import hookspecs
from .config import (
    PRESET_SEPARATOR,
    StrictConfig,
    build_config,
    join_preset,
    split_preset,
    validation_message,
)
from .data import DataSpec
from .errors import BdtkError, ConfigError, PluginUnavailableError, UnknownNameError, UnknownPresetError
from .interfaces import (
    REFERENCE_ROWS,
    Attack,
    AttackConfig,
    Kind,
    Plugin,
    PluginMeta,
    Preset,
    Purifier,
    TriggerInverter,
)

ENTRY_POINT_GROUP = "bdtk"
LOAD_ENV = "BDTK_LOAD_PLUGINS"
DISABLE_ENV = "BDTK_DISABLE_PLUGINS"
#: The distribution of the built-in plugins: its entry points load first, so its names win clashes.
BUILTIN_DISTRIBUTION = "backdoor-toolkit"
#: Separates a distribution from a plugin name, `bdtk-clp/clp` (and `bdtk-clp/clp:strict`): it picks
#: one of two plugins that claim a name. Neither plugin nor distribution names can contain it, and
#: it is not the preset separator ':', so `split_preset` and `--set DIST/NAME.FIELD=…` keep working.
DISTRIBUTION_SEPARATOR = "/"
IN_PROCESS = "(in-process)"  # the distribution recorded for plugins registered by register_plugin
_BASES: dict[Kind, type[Plugin]] = {
    "attack": Attack,
    "inverter": TriggerInverter,
    "purifier": Purifier,
}
#: Plugin names: lower-case, starting with a letter or digit.
PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
#: Names a plugin of the kind may not take: results already use them for something else (a
#: purifier called "none" or "clean-model" would pass for a reference row, `interfaces.REFERENCE_ROWS`).
RESERVED_NAMES: dict[Kind, frozenset[str]] = {"purifier": frozenset(REFERENCE_ROWS)}
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
    """A registered plugin: its kind ("attack", "inverter", "purifier"), its name, its class and
    where it came from."""

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

    @property
    def qualified_name(self) -> str:
        """`DIST/NAME`: selects this class even when another distribution's took `NAME`."""
        return f"{self.source.distribution}{DISTRIBUTION_SEPARATOR}{self.name}"


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be imported or could not register its classes, or one of whose
    classes lost a name clash (`clash`: its other classes did load)."""

    plugin: str
    distribution: str
    error: str
    detail: str
    #: Names of the classes the plugin offered before failing, so a lookup of one can say why.
    names: tuple[str, ...] = ()
    clash: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"plugin": self.plugin, "distribution": self.distribution, "error": self.error}

    @property
    def origin(self) -> str:
        if self.distribution == IN_PROCESS:
            return f"in-process plugin {self.plugin!r}"
        return f"distribution {self.distribution!r}"


@dataclass(frozen=True)
class SkippedPlugin:
    """An installed plugin left unloaded on purpose, by `env` (`BDTK_DISABLE_PLUGINS` or
    `BDTK_LOAD_PLUGINS`): listed so that a user who asks for one of its names learns why."""

    plugin: str
    distribution: str
    version: str
    env: str

    @property
    def reason(self) -> str:
        return f"disabled by {DISABLE_ENV}" if self.env == DISABLE_ENV else f"not listed in {LOAD_ENV}"

    def as_dict(self) -> dict[str, str]:
        return {
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "reason": self.reason,
        }


@dataclass
class Registry:
    by_kind: dict[Kind, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in _BASES})
    #: Every accepted class by (normalised distribution, name), including one that lost a clash
    #: and is missing from `by_kind`: what `DIST/NAME` selects.
    qualified: dict[Kind, dict[tuple[str, str], PluginInfo]] = field(
        default_factory=lambda: {k: {} for k in _BASES}
    )
    failures: list[LoadFailure] = field(default_factory=list)
    skipped: list[SkippedPlugin] = field(default_factory=list)
    #: `BDTK_LOAD_PLUGINS` / `BDTK_DISABLE_PLUGINS` entries that name no installed plugin (a typo
    #: there would otherwise load, or leave on, something else without a word).
    unmatched: list[str] = field(default_factory=list)

    def all(self) -> list[PluginInfo]:
        return [info for kind in _BASES for info in sorted(self.by_kind[kind].values(), key=_by_name)]

    def named(self, name: str) -> list[PluginInfo]:
        """Every plugin called `name` (or `DIST/NAME`), of any kind (an attack and a purifier may
        share a name)."""
        return [info for kind in _BASES if (info := self.lookup(kind, name)) is not None]

    def lookup(self, kind: Kind, name: str) -> PluginInfo | None:
        """The `kind` plugin `NAME` (the first to claim it) or `DIST/NAME`; None when there is none."""
        dist, sep, base = name.partition(DISTRIBUTION_SEPARATOR)
        if not sep:
            return self.by_kind[kind].get(name)
        return self.qualified[kind].get((normalize_name(dist), base))

    def known(self, kinds: tuple[Kind, ...], name: str) -> list[str]:
        """The names to suggest for a misspelt `name`: `DIST/NAME` spellings when it has one."""
        if DISTRIBUTION_SEPARATOR in name:
            return sorted({info.qualified_name for kind in kinds for info in self.qualified[kind].values()})
        return sorted({n for kind in kinds for n in self.by_kind[kind]})

    def why_missing(self, name: str) -> str | None:
        """Why `name` (`NAME` or `DIST/NAME`) is not registered, when it can be attributed to a
        plugin that failed to load or was left unloaded: by the names its classes carried, its
        entry-point name, or its distribution's name (`clp`, `bdtk-clp`). None otherwise."""
        for failure in self.failures:
            if not failure.clash and _claims(failure.plugin, failure.distribution, failure.names, name):
                return f"{failure.origin} failed to load: {failure.error}"
        for skipped in self.skipped:
            if _claims(skipped.plugin, skipped.distribution, (), name):
                return f"distribution {skipped.distribution!r} is {skipped.reason}."
        return None

    def missing_note(self) -> str:
        """For an unknown name no failure explains: how many distributions failed or are off."""
        failed = len({f.distribution for f in self.failures if not f.clash})
        disabled = len({s.distribution for s in self.skipped if s.env == DISABLE_ENV})
        parts = []
        if failed:
            parts.append(f"{failed} plugin distribution{'s' * (failed != 1)} failed to load")
        if disabled:
            count = str(disabled) if parts else f"{disabled} plugin distribution{'s' * (disabled != 1)}"
            parts.append(f"{count} {'is' if disabled == 1 else 'are'} disabled by {DISABLE_ENV}")
        note = f"Note: {' and '.join(parts)} (see `bdtk plugins`)." if parts else ""
        return " ".join([note, *self.unmatched]).strip()


def _claims(plugin: str, distribution: str, names: tuple[str, ...], wanted: str) -> bool:
    """Whether `wanted` plausibly belongs to the plugin `plugin` of `distribution`, which offered
    `names` before failing (often nothing: an import error stops it before any class is seen)."""
    dist = normalize_name(distribution)
    qualifier, sep, _ = wanted.partition(DISTRIBUTION_SEPARATOR)
    if sep:
        return normalize_name(qualifier) == dist
    key = normalize_name(wanted)
    return wanted in names or key in {normalize_name(plugin), dist} or dist == f"bdtk-{key}"


def _by_name(info: PluginInfo) -> str:
    return info.name


_pm: pluggy.PluginManager | None = None
_sources: dict[str, Source] = {}
_load_failures: list[LoadFailure] = []
_skipped: list[SkippedPlugin] = []
_unmatched: list[str] = []
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
    _skipped.clear()
    _unmatched.clear()


def normalize_name(name: str) -> str:
    """Distribution names compare like pip compares them: case- and `-_.`-insensitive."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _names_in(env: str) -> set[str] | None:
    """The normalised names listed in the environment variable `env`; None when it is unset."""
    value = os.environ.get(env)
    if value is None:
        return None
    return {normalize_name(part.strip()) for part in value.split(",") if part.strip()}


def _load_order(ep: md.EntryPoint) -> tuple[bool, str, str]:
    """bdtk's own entry points first, then by distribution, then by entry-point name: the order
    decides which plugin keeps a name two of them claim, so it must not depend on sys.path."""
    dist = normalize_name(ep.dist.name) if ep.dist is not None else ""
    return (dist != BUILTIN_DISTRIBUTION, dist, ep.name)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _names_in(LOAD_ENV)
    disabled = _names_in(DISABLE_ENV) or set()
    installed: set[str] = set()
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=_load_order):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        names = {normalize_name(dist), normalize_name(ep.name)}
        installed |= names
        if names & disabled:
            _skipped.append(SkippedPlugin(ep.name, dist, version, DISABLE_ENV))
            continue
        if allowed is not None and not names & allowed:
            _skipped.append(SkippedPlugin(ep.name, dist, version, LOAD_ENV))
            continue
        # pluggy needs unique plugin names; another distribution's entry point of the same name
        # loads under `DIST/NAME` rather than being dropped unseen
        key = ep.name if pm.get_plugin(ep.name) is None else f"{dist}{DISTRIBUTION_SEPARATOR}{ep.name}"
        if pm.get_plugin(key) is not None:
            continue
        source = Source(ep.name, dist, version)
        try:
            module = ep.load()
            _register_checked(pm, module, source, key)
        except Exception as exc:  # a broken plugin must not take the others down
            _load_failures.append(LoadFailure(ep.name, dist, _one_line(exc), traceback.format_exc()))
    for env, listed in ((LOAD_ENV, allowed or set()), (DISABLE_ENV, disabled)):
        for name in sorted(listed - installed):
            _unmatched.append(
                f"{env} names {name!r}, which no installed plugin distribution or entry point has "
                f"(installed: {', '.join(sorted(installed)) or 'none'})."
            )


def _register_checked(
    pm: pluggy.PluginManager, plugin: object, source: Source, key: str | None = None
) -> None:
    """Register `plugin` (as pluggy's `key`, by default `source.plugin`), refusing hook
    implementations that match no hookspec (misspellings)."""
    key = key or source.plugin
    pm.register(plugin, name=key)
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
    _sources[key] = source


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

    A plugin's classes enter the registry only when all its hooks return without error and every
    class of every kind passes the checks; otherwise the whole plugin is listed under `failures`.
    Hooks run in load order (not pluggy's call order, which `tryfirst` could change), so of two
    classes of one kind that claim a name the first keeps it; the other is listed under `failures`
    too, naming both, and stays reachable as `DIST/NAME`.
    """
    global _registry
    if _registry is None:
        pm = get_plugin_manager()
        rank = {key: i for i, key in enumerate(_sources)}  # load order, then in-process order
        registry = Registry(failures=list(_load_failures), skipped=list(_skipped), unmatched=list(_unmatched))
        # every hook of every plugin runs and is checked first: a plugin with one malformed class
        # (of any kind) is left out whole, so it is never half-installed
        accepted: list[tuple[Kind, type[Any], Source]] = []
        failed: set[tuple[str, str]] = set()  # (distribution, plugin)
        for kind, hook_name in _HOOKS.items():
            impls = getattr(pm.hook, hook_name).get_hookimpls()
            for impl in sorted(impls, key=lambda impl: rank.get(impl.plugin_name, len(rank))):
                source = _sources.get(impl.plugin_name, Source(impl.plugin_name, "?", "?"))
                offered: list[type[Any]] = []
                try:
                    impl.function(register=offered.append)
                    for cls in offered:
                        check_plugin_class(cls, kind, source)
                except Exception as exc:  # a broken plugin must not take the others down
                    failed.add((source.distribution, source.plugin))
                    registry.failures.append(
                        LoadFailure(
                            source.plugin,
                            source.distribution,
                            _one_line(exc),
                            traceback.format_exc(),
                            _offered_names(offered),
                        )
                    )
                    continue
                accepted += [(kind, cls, source) for cls in offered]
        left_out: dict[tuple[str, str], tuple[str, ...]] = {}
        for kind, cls, source in accepted:
            key = (source.distribution, source.plugin)
            if key in failed:
                left_out[key] = (*left_out.get(key, ()), *_offered_names([cls]))
                continue
            clash = _add(registry, kind, cls, source)
            if clash:
                registry.failures.append(
                    LoadFailure(source.plugin, source.distribution, clash, "", (cls.name,), True)
                )
        # a lookup of a well-formed class left out with its plugin says why, as for the broken one
        registry.failures = [
            f
            if f.clash
            else dataclasses.replace(f, names=(*f.names, *left_out.pop((f.distribution, f.plugin), ())))
            for f in registry.failures
        ]
        _registry = registry
    return _registry


def _offered_names(offered: list[type[Any]]) -> tuple[str, ...]:
    return tuple(name for cls in offered if isinstance(name := getattr(cls, "name", None), str))


def _add(registry: Registry, kind: Kind, cls: type[Plugin], source: Source) -> str | None:
    """Enter `cls`; the first class to claim a name keeps it. Returns why `cls` was left out of
    plain-name lookups (a one-line message naming both classes), or None."""
    info = PluginInfo(kind, cls.name, cls, source)
    registry.qualified[kind].setdefault((normalize_name(source.distribution), cls.name), info)
    table = registry.by_kind[kind]
    other = table.get(cls.name)
    if other is None:
        table[cls.name] = info
        return None
    dists = {normalize_name(other.source.distribution), normalize_name(source.distribution)}
    if len(dists) == 2 and IN_PROCESS not in dists:
        how = (
            f"select one as {other.qualified_name!r} or {info.qualified_name!r}, "
            f"or turn one distribution off with {DISABLE_ENV}"
        )
    else:  # one distribution (or an in-process plugin): `DIST/NAME` cannot tell them apart
        how = "rename one"
    return (
        f"Duplicate {kind} name {cls.name!r}: {_describe(other)} has it, so {_describe(info)} is "
        f"left out; {how}."
    )


def _describe(info: PluginInfo) -> str:
    return f"{info.cls.__module__}.{info.cls.__qualname__} of {info.source}"


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
    if name in RESERVED_NAMES.get(kind, ()):
        raise PluginError(
            f"{where}: {cls.__qualname__}.name {name!r} is reserved for {kind}s (results use it for "
            "a reference row: the undefended or the never-backdoored model); choose another."
        )
    # the interface's own Config is the base every config of the kind needs (AttackConfig holds
    # the target, mode and poison rate the runner reads); a plain StrictConfig would pass until a
    # run reads those fields
    required = base.Config
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, required)):
        shared = ", ".join(f for f in required.model_fields if f not in StrictConfig.model_fields)
        why = f" (it holds the fields every {kind} needs: {shared})" if shared else ""
        got = cls.Config.__name__ if isinstance(cls.Config, type) else repr(cls.Config)
        raise PluginError(
            f"{where}: {cls.__qualname__}.Config must subclass {required.__name__}{why}, got {got}."
        )
    if not isinstance(getattr(cls, "meta", None), PluginMeta):
        raise PluginError(f"{where}: {cls.__qualname__}.meta must be a PluginMeta.")
    undocumented = [f for f, info in cls.Config.model_fields.items() if not info.description]
    if undocumented:
        raise PluginError(
            f"{where}: {cls.__qualname__}.Config fields lack a description: {', '.join(undocumented)}."
        )
    # a plugin runs by name alone (`-d NAME`), so every field needs a default; without one the
    # plugin would list, then fail at its first run with what reads like the user's error
    no_default = [f for f, info in cls.Config.model_fields.items() if info.is_required()]
    if no_default:
        raise PluginError(
            f"{where}: {cls.__qualname__}.Config fields have no default: {', '.join(no_default)} "
            "(a plugin must run by name alone)."
        )
    try:
        cls.Config()
    except ValidationError as exc:
        raise PluginError(
            f"{where}: {cls.__qualname__}.Config does not validate with its defaults: "
            f"{validation_message(cls.Config, exc)}."
        ) from None
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
            raise PluginError(
                f"{where}: {owner}.presets[{key!r}] does not validate against {owner}.Config: "
                f"{validation_message(cls.Config, exc)}."
            ) from None


def get_plugin(kind: Kind, name: str) -> PluginInfo:
    """Look a plugin up by kind and `NAME` or `DIST/NAME`; an unknown name lists those that exist.

    A `NAME:PRESET` is refused with a pointer to `resolve_config`: a lookup by name alone would
    silently drop the preset. A name that belongs to a plugin that failed to load (or is turned
    off) says so: see `Registry.why_missing`.
    """
    registry = get_registry()
    info = registry.lookup(kind, name)
    if info is None:
        base, sep, _ = name.partition(PRESET_SEPARATOR)
        if sep and registry.lookup(kind, base) is not None:
            raise BdtkError(
                f"{kind} {name!r} selects a preset of {base!r}; resolve it with "
                f"resolve_config({kind!r}, {name!r})"
                + f" or create_{kind}({name!r}{', spec=...' if kind == 'attack' else ''})"
                + ", not with a lookup by name alone."
            )
        raise _missing(registry, kind, name, (kind,))
    return info


def _missing(registry: Registry, label: str, name: str, kinds: tuple[Kind, ...]) -> UnknownNameError:
    """The error for a name no loaded plugin has: why, when a failed or unloaded plugin explains
    it; otherwise "unknown" with suggestions, noting plugins that failed to load or are off."""
    reason = registry.why_missing(name)
    if reason is not None:
        return PluginUnavailableError(label, name, reason)
    return UnknownNameError(label, name, registry.known(kinds, name), registry.missing_note())


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


def _chosen(
    kind: Kind, choice: str | ResolvedPlugin, config: Mapping[str, Any] | None, where: str | None
) -> ResolvedPlugin:
    """`choice` resolved (defaults ⊕ preset ⊕ `config`), or as given when already resolved.

    A `ResolvedPlugin` carries its config already: values passed beside it would have to be merged
    over a config whose preset and overrides are no longer told apart, so they are refused.
    """
    if not isinstance(choice, ResolvedPlugin):
        return resolve_plugin(kind, choice, overrides=config, where=where)
    if config is not None:
        raise TypeError(f"{choice.label!r} is already resolved; pass config values when resolving it.")
    if choice.info.kind != kind:
        raise BdtkError(f"create_{kind} was given {choice.info.kind} {choice.label!r}; it creates {kind}s.")
    return choice


# `info.cls` typed as its interface (one function per kind: mypy refuses an abstract class as a
# `type[T]` argument). Registration has checked the class, so these never fail for a registered one.


def _attack_class(info: PluginInfo) -> type[Attack]:
    if not issubclass(cls := info.cls, Attack):
        raise _not_a(info, Attack)
    return cls


def _inverter_class(info: PluginInfo) -> type[TriggerInverter]:
    if not issubclass(cls := info.cls, TriggerInverter):
        raise _not_a(info, TriggerInverter)
    return cls


def _purifier_class(info: PluginInfo) -> type[Purifier]:
    if not issubclass(cls := info.cls, Purifier):
        raise _not_a(info, Purifier)
    return cls


def _not_a(info: PluginInfo, base: type[Plugin]) -> PluginError:
    return PluginError(f"{info.kind} {info.name!r} is {info.cls!r}, not a {base.__name__} subclass.")


def create_attack(
    choice: str | ResolvedPlugin,
    config: Mapping[str, Any] | None = None,
    *,
    spec: DataSpec,
    seed: int = 0,
    where: str | None = None,
) -> Attack:
    """The attack chosen by `NAME`, `NAME:PRESET` or `DIST/NAME` (with `config` over the preset's
    values), or by a `ResolvedPlugin` the caller already holds, instantiated for `spec`.

    Instantiating checks the trigger's parameters against the dataset (`Attack.validate_for`) and
    raises ConfigError, so the runner calls it once per dataset before anything trains.
    """
    resolved = _chosen("attack", choice, config, where)
    settings = resolved.config
    if not isinstance(settings, AttackConfig):  # registration requires Config ⊆ AttackConfig
        raise PluginError(f"attack {resolved.label!r}: its config is not an AttackConfig.")
    return _attack_class(resolved.info)(settings, spec, seed=seed)


def create_inverter(
    choice: str | ResolvedPlugin,
    config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    where: str | None = None,
) -> TriggerInverter:
    """An inverter chosen by `NAME`, `NAME:PRESET` or `DIST/NAME` (e.g. a purifier's `inverter`
    field), with `config` over the preset's values, or by a `ResolvedPlugin`.

    The one place where a plugin's config names another plugin, so that every purifier that runs
    an inverter accepts the same syntax and resolves it in the same order.
    """
    resolved = _chosen("inverter", choice, config, where)
    return _inverter_class(resolved.info)(resolved.config, seed=seed)


def create_purifier(
    choice: str | ResolvedPlugin,
    config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    where: str | None = None,
) -> Purifier:
    """The purifier chosen by `NAME`, `NAME:PRESET` or `DIST/NAME` (with `config` over the preset's
    values), or by a `ResolvedPlugin`, to run on `device` (default: the CPU)."""
    resolved = _chosen("purifier", choice, config, where)
    return _purifier_class(resolved.info)(resolved.config, seed=seed, device=device)


def find_plugins(name: str) -> list[PluginInfo]:
    """Every plugin called `name` (or `DIST/NAME`) across kinds; an unknown name answers "did you
    mean" (or why it is missing, see `get_plugin`)."""
    registry = get_registry()
    matches = registry.named(name)
    if not matches:
        raise _missing(registry, "plugin", name, tuple(_BASES))
    return matches


def get_attack(name: str) -> type[Attack]:
    """The attack class `NAME` (or `DIST/NAME`); `create_attack` also resolves presets and configs."""
    return _attack_class(get_plugin("attack", name))


def get_inverter(name: str) -> type[TriggerInverter]:
    """The inverter class `NAME` (or `DIST/NAME`); `create_inverter` also resolves presets and configs."""
    return _inverter_class(get_plugin("inverter", name))


def get_purifier(name: str) -> type[Purifier]:
    """The purifier class `NAME` (or `DIST/NAME`); `create_purifier` also resolves presets and configs."""
    return _purifier_class(get_plugin("purifier", name))
