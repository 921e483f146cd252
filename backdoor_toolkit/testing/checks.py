"""Checks of the plugin interface contract, usable from any test runner (no pytest needed).

A check runs a plugin class against the tiny inputs of `inputs` and raises `ConformanceError`
(an AssertionError, so every runner reports it as a failed test) naming the broken rule:
`check_attack`, `check_inverter`, `check_purifier`, or `check_plugin` to dispatch on the class's
kind. Each first runs `check_config` (the config and metadata contract). They verify output types,
shapes and ranges, that inputs the plugin must not touch are unchanged (the defense data; an
inverter's model weights; an attack's input batch), and that outputs are on the device of the
inputs. The pytest fixtures live apart in `pytest_plugin`, so importing these checks never
imports pytest.

Fast settings: a check runs the plugin with `config` when given, else with the class attribute
`conformance_config` (a dict of small values, e.g. `{"steps": 5}`) when the class defines one,
else with its defaults. Give slow methods a `conformance_config` so the registry-wide meta-test
(`tests/test_conformance.py`) stays fast.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from ..config import StrictConfig, build_config
from ..data import DataSpec, DefenseData, ImageData, to_float
from ..interfaces import (
    Attack,
    AttackContext,
    InversionResult,
    Kind,
    Plugin,
    PoisonedTrainingSet,
    PurificationResult,
    Purifier,
    TriggerInverter,
)
from ..models import check_capabilities, create_model
from ..plugins import (
    IN_PROCESS,
    PluginInfo,
    ResolvedPlugin,
    Source,
    check_plugin_class,
    create_attack,
    create_inverter,
    create_purifier,
    get_registry,
    normalize_name,
)
from .inputs import TINY_SPEC, tiny_defense_data, tiny_images, tiny_model, tiny_settings


class ConformanceError(AssertionError):
    """A plugin breaks the interface contract; the message names the plugin and the rule."""


def _fail(cls: type[Plugin], message: str) -> ConformanceError:
    return ConformanceError(f"{getattr(cls, 'name', cls.__qualname__)!s}: {message}")


# --- the config and metadata contract ---------------------------------------------------------


def _config_values(cls: type[Plugin], config: dict[str, Any] | None) -> dict[str, Any]:
    if config is not None:
        return config
    return dict(getattr(cls, "conformance_config", {}))


def check_config(cls: type[Plugin], kind: Kind | None = None) -> None:
    """The class is registrable, its Config forbids extra fields, every field is described and
    numeric fields are bounded, defaults validate, and configs survive a JSON round trip."""
    kind = kind or cls.kind
    try:
        check_plugin_class(cls, kind)
    except Exception as exc:
        raise _fail(cls, str(exc)) from None
    config_cls = cls.Config
    if config_cls.model_config.get("extra") != "forbid":
        raise _fail(cls, "Config must forbid extra fields (subclass StrictConfig, do not override `extra`).")
    try:
        config_cls.model_validate({"bdtk_conformance_unknown_field": 1})
    except ValidationError:
        pass
    else:
        raise _fail(cls, "Config accepted an unknown field.")
    for field_name, info in config_cls.model_fields.items():
        if _is_number(info.annotation) and not _bounded(info.metadata):
            raise _fail(cls, f"Config field {field_name!r} is numeric but declares no bounds (ge/gt/le/lt).")
        for element in _number_elements(info.annotation):
            if not _bounded(_annotated_metadata(element)):
                raise _fail(
                    cls,
                    f"Config field {field_name!r} holds numbers without bounds; bound each one, e.g. "
                    "list[Annotated[float, Field(ge=0, le=10)]].",
                )
    defaults = config_cls()  # check_plugin_class above has refused defaults that do not validate
    json.dumps(config_cls.model_json_schema())
    dumped = json.loads(json.dumps(defaults.model_dump(mode="json")))
    if config_cls.model_validate(dumped) != defaults:
        raise _fail(cls, "Config does not survive a JSON round trip (results store configs as JSON).")
    if not cls.meta.summary.strip():
        raise _fail(cls, "meta.summary is empty.")
    json.dumps(cls.meta.model_dump(mode="json"))


def _bounded(metadata: Sequence[Any]) -> bool:
    return any(getattr(m, bound, None) is not None for m in metadata for bound in ("ge", "gt", "le", "lt"))


def _annotated_metadata(annotation: Any) -> list[Any]:
    """The constraints of `Annotated[T, ...]` (a `Field(...)` carries them in its own metadata)."""
    if get_origin(annotation) is not Annotated:
        return []
    found: list[Any] = []
    for extra in get_args(annotation)[1:]:
        found += [extra, *getattr(extra, "metadata", [])]
    return found


def _number_elements(annotation: Any) -> list[Any]:
    """The element annotations of the lists and tuples of numbers in a field's annotation (through
    `| None`): `list[float]` → [float], `tuple[float, float]` → [float, float]."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return [e for arg in get_args(annotation) for e in _number_elements(arg)]
    if origin not in (list, tuple):
        return []
    elements = [a for a in get_args(annotation) if a is not Ellipsis]
    bare = [get_args(e)[0] if get_origin(e) is Annotated else e for e in elements]
    return [e for e, b in zip(elements, bare, strict=True) if _is_number(b)]


def _is_number(annotation: Any) -> bool:
    """int or float, optionally `| None` (bool and containers are not bounded by ge/le)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        args = set(get_args(annotation)) - {type(None)}
        return bool(args) and args <= {int, float}
    return False


def _build(cls: type[Plugin], config: dict[str, Any] | None) -> StrictConfig:
    return build_config(cls.Config, _config_values(cls, config), f"{cls.kind} {cls.name!r}")


def _resolved(cls: type[Plugin], kind: Kind, config: dict[str, Any] | None) -> ResolvedPlugin:
    """`cls` and its validated config as the registry hands a choice to a factory, so the kit
    instantiates a plugin the way the runner does, whether or not the class is registered."""
    return ResolvedPlugin(
        PluginInfo(kind, cls.name, cls, Source(cls.name, IN_PROCESS, "")), _build(cls, config)
    )


# --- helpers for the behavioural checks -------------------------------------------------------


def _snapshot(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _data_tensors(data: DefenseData) -> dict[str, Tensor]:
    return {
        "train.images": data.train.images,
        "train.labels": data.train.labels,
        "val.images": data.val.images,
        "val.labels": data.val.labels,
        "index_train": data.index_train,
        "index_val": data.index_val,
    }


def _changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> list[str]:
    return [
        k for k, v in before.items() if k not in after or not torch.equal(v, after[k].detach().to(v.device))
    ]


def _check_unit_range(cls: type[Plugin], what: str, t: Tensor, eps: float = 1e-5) -> None:
    if not torch.isfinite(t).all():
        raise _fail(cls, f"{what} has non-finite values.")
    if t.numel() and (t.min() < -eps or t.max() > 1 + eps):
        raise _fail(cls, f"{what} leaves [0, 1] (range {float(t.min()):.3g}…{float(t.max()):.3g}).")


def _check_shape(cls: type[Plugin], what: str, t: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise _fail(cls, f"{what} must be a Tensor, got {type(t).__name__}.")
    if tuple(t.shape) != shape:
        raise _fail(cls, f"{what} has shape {tuple(t.shape)}, expected {shape}.")


def _check_json(cls: type[Plugin], what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise _fail(cls, f"{what} must be JSON-serialisable: {exc}") from None


def _device_of(model: nn.Module) -> set[torch.device]:
    return {t.device for t in [*model.parameters(), *model.buffers()]}


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


# --- attacks -----------------------------------------------------------------------------------


def check_attack(
    cls: type[Attack],
    config: dict[str, Any] | None = None,
    spec: DataSpec = TINY_SPEC,
    device: torch.device | None = None,
) -> PoisonedTrainingSet:
    """Prepare, trigger, poison, save/restore trigger state and fit one epoch on a tiny model."""
    device = device or torch.device("cpu")
    check_config(cls, "attack")
    resolved = _resolved(cls, "attack", config)
    attack = create_attack(resolved, spec=spec, seed=0)
    train = tiny_images(spec)
    settings = tiny_settings(device, spec)
    attack.prepare(AttackContext(spec, train, "small-cnn", settings, lambda: tiny_model(spec, device)))

    x = to_float(tiny_images(spec, 8, seed=5).images).to(device)
    x_before = x.clone()
    triggered = attack.apply_trigger(x)
    _check_shape(cls, "apply_trigger(x)", triggered, tuple(x.shape))
    if not triggered.is_floating_point() or not _same_device(triggered.device, device):
        raise _fail(
            cls,
            f"apply_trigger must return float images on {device}, "
            f"got {triggered.dtype} on {triggered.device}.",
        )
    _check_unit_range(cls, "apply_trigger(x)", triggered)
    if not torch.equal(x, x_before):
        raise _fail(cls, "apply_trigger modified its input batch in place; return a new tensor.")
    if torch.equal(triggered, x):
        raise _fail(cls, "apply_trigger returned the images unchanged.")

    labels = torch.arange(8, device=device) % spec.num_classes
    targets = attack.target_labels(labels)
    _check_shape(cls, "target_labels(y)", targets, (8,))
    if targets.dtype != torch.long or targets.min() < 0 or targets.max() >= spec.num_classes:
        raise _fail(cls, "target_labels must return int64 classes in [0, num_classes).")

    train_before = _snapshot({"images": train.images, "labels": train.labels})
    poisoned = attack.poison_training_set(train)
    if _changed(train_before, {"images": train.images, "labels": train.labels}):
        raise _fail(cls, "poison_training_set modified the clean training set in place.")
    _check_poisoned(cls, attack, train, poisoned)

    deterministic = torch.equal(attack.apply_trigger(x), triggered)
    state = attack.trigger_state()
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise _fail(cls, "trigger_state must return a dict of str → Tensor.")
    restored = create_attack(resolved, spec=spec, seed=0)
    restored.load_trigger_state({k: v.detach().cpu().clone() for k, v in state.items()})
    if deterministic and not torch.allclose(restored.apply_trigger(x), triggered, atol=1e-5):
        raise _fail(
            cls, "after load_trigger_state(trigger_state()) the trigger differs from the original one."
        )

    batch_x, batch_y = attack.training_batch(poisoned.images[:16].clone(), poisoned.labels[:16].clone())
    if batch_x.shape[1:] != poisoned.images.shape[1:] or batch_x.shape[0] != batch_y.shape[0]:
        raise _fail(
            cls, "training_batch must return images of the input's image shape and one label per image."
        )

    model = create_model("small-cnn", spec).to(device)
    before = _snapshot(dict(model.state_dict()))
    attack.fit(model, poisoned, settings)
    after = dict(model.state_dict())
    if not _changed(before, after):
        raise _fail(cls, "fit did not train the model.")
    if not all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point()):
        raise _fail(cls, "fit produced non-finite weights.")
    if any(not _same_device(d, device) for d in _device_of(model)):
        raise _fail(cls, f"fit moved the model off {device}.")
    return poisoned


def _check_poisoned(
    cls: type[Attack], attack: Attack, train: ImageData, poisoned: PoisonedTrainingSet
) -> None:
    n = len(train)
    if not isinstance(poisoned, PoisonedTrainingSet):
        raise _fail(
            cls, f"poison_training_set must return a PoisonedTrainingSet, got {type(poisoned).__name__}."
        )
    _check_shape(cls, "poisoned images", poisoned.images, tuple(train.images.shape))
    _check_shape(cls, "poisoned labels", poisoned.labels, (n,))
    _check_unit_range(cls, "poisoned images", poisoned.images)
    index = poisoned.poisoned_index.cpu()
    if index.numel() != index.unique().numel() or (index.numel() and (index.min() < 0 or index.max() >= n)):
        raise _fail(cls, "poisoned_index must hold distinct positions in the training set.")
    expected = round(attack.config.poison_rate * n)
    # training-controlled attacks may poison each batch instead (then nothing is poisoned here)
    controls_training = cls.training_batch is not Attack.training_batch or cls.fit is not Attack.fit
    if index.numel() != expected and not (controls_training and index.numel() == 0):
        raise _fail(cls, f"poisoned {index.numel()} images, but poison_rate asks for {expected}.")
    clean = torch.ones(n, dtype=torch.bool)
    clean[index] = False
    if not torch.equal(poisoned.images.cpu()[clean], train.float_images()[clean]):
        raise _fail(cls, "images outside poisoned_index were changed.")
    if not torch.equal(poisoned.labels.cpu()[clean], train.labels[clean]):
        raise _fail(cls, "labels outside poisoned_index were changed.")
    if not cls.clean_label and index.numel():
        wanted = attack.target_labels(train.labels[index])
        if not torch.equal(poisoned.labels.cpu()[index], wanted.cpu()):
            raise _fail(
                cls, "poisoned labels differ from target_labels (set clean_label = True if intended)."
            )


# --- trigger inverters -------------------------------------------------------------------------


def check_inverter(
    cls: type[TriggerInverter],
    config: dict[str, Any] | None = None,
    spec: DataSpec = TINY_SPEC,
    device: torch.device | None = None,
) -> InversionResult:
    """Invert every class (and a subset) of a tiny model; weights and defense data stay untouched."""
    device = device or torch.device("cpu")
    check_config(cls, "inverter")
    inverter = create_inverter(_resolved(cls, "inverter", config), seed=0)
    model = tiny_model(spec, device)
    data = tiny_defense_data(spec)
    weights, tensors = _snapshot(dict(model.state_dict())), _snapshot(_data_tensors(data))
    result = inverter.invert(model, data)
    _check_inversion(cls, result, list(range(spec.num_classes)), spec)
    subset = [spec.num_classes - 1]
    _check_inversion(cls, inverter.invert(model, data, classes=subset), subset, spec)
    changed = _changed(weights, dict(model.state_dict()))
    if changed:
        raise _fail(cls, f"invert changed the model's weights or buffers: {', '.join(changed[:5])}.")
    if _changed(tensors, _data_tensors(data)):
        raise _fail(
            cls, f"invert changed the defense data: {', '.join(_changed(tensors, _data_tensors(data)))}."
        )
    if any(not _same_device(d, device) for d in _device_of(model)):
        raise _fail(cls, f"invert moved the model off {device}.")
    return result


def _check_inversion(cls: type[TriggerInverter], result: Any, classes: list[int], spec: DataSpec) -> None:
    if not isinstance(result, InversionResult):
        raise _fail(cls, f"invert must return an InversionResult, got {type(result).__name__}.")
    if list(result.classes) != classes:
        raise _fail(cls, f"invert(classes={classes}) returned classes {result.classes}.")
    k, (c, h, w) = len(classes), spec.image_shape
    _check_shape(cls, "masks", result.masks, (k, 1, h, w))
    _check_shape(cls, "patterns", result.patterns, (k, c, h, w))
    for name in ("mask_norms", "attack_success", "anomaly_index"):
        _check_shape(cls, name, getattr(result, name), (k,))
    _check_unit_range(cls, "masks", result.masks.detach())
    _check_unit_range(cls, "patterns", result.patterns.detach())
    _check_unit_range(cls, "attack_success", result.attack_success.detach())
    if not torch.isfinite(result.mask_norms).all() or (result.mask_norms < 0).any():
        raise _fail(cls, "mask_norms must be finite and non-negative.")
    if not set(result.flagged) <= set(classes):
        raise _fail(cls, f"flagged {result.flagged} is not a subset of the inverted classes {classes}.")
    if sorted(result.ranked()) != sorted(classes):
        raise _fail(cls, "ranked() must order exactly the inverted classes.")
    _check_json(cls, "InversionResult.diagnostics", result.diagnostics)


# --- purifiers ---------------------------------------------------------------------------------


def check_purifier(
    cls: type[Purifier],
    config: dict[str, Any] | None = None,
    spec: DataSpec = TINY_SPEC,
    device: torch.device | None = None,
) -> PurificationResult:
    """Purify a tiny model; the defense data stays untouched and the result is a usable model."""
    device = device or torch.device("cpu")
    check_config(cls, "purifier")
    purifier = create_purifier(_resolved(cls, "purifier", config), seed=0, device=device)
    model = tiny_model(spec, device)
    check_capabilities(model, cls.meta.requires, f"Defense {cls.name!r}")
    data = tiny_defense_data(spec)
    weights, tensors = _snapshot(dict(model.state_dict())), _snapshot(_data_tensors(data))
    result = purifier.purify(model, data)
    if not isinstance(result, PurificationResult):
        raise _fail(cls, f"purify must return a PurificationResult, got {type(result).__name__}.")
    if _changed(tensors, _data_tensors(data)):
        raise _fail(
            cls, f"purify changed the defense data: {', '.join(_changed(tensors, _data_tensors(data)))}."
        )
    out = result.model
    if not isinstance(out, nn.Module):
        raise _fail(cls, f"PurificationResult.model must be an nn.Module, got {type(out).__name__}.")
    if any(not _same_device(d, device) for d in _device_of(out)):
        raise _fail(
            cls, f"the purified model must stay on {device}; found {sorted(map(str, _device_of(out)))}."
        )
    out.eval()
    with torch.no_grad():
        logits = out(to_float(data.val.images[:8]).to(device))
    _check_shape(cls, "purified model's logits", logits, (8, spec.num_classes))
    if not torch.isfinite(logits).all() or not _same_device(logits.device, device):
        raise _fail(cls, f"the purified model must give finite logits on {device}.")
    if not isinstance(result.modified, bool) or result.detected not in (None, True, False):
        raise _fail(cls, "modified must be a bool and detected a bool or None.")
    if not result.modified and _changed(weights, dict(out.state_dict())):
        raise _fail(cls, "modified=False but the model's weights changed.")
    _check_json(cls, "PurificationResult.diagnostics", result.diagnostics)
    if not all(isinstance(k, str) and isinstance(v, float | int) for k, v in result.stage_seconds.items()):
        raise _fail(cls, "stage_seconds must map stage names to seconds.")
    if result.inversion is not None and not isinstance(result.inversion, InversionResult):
        raise _fail(cls, f"inversion must be an InversionResult or None: {type(result.inversion).__name__}.")
    return result


#: The check for each plugin kind.
CHECKS: dict[Kind, Callable[..., Any]] = {
    "attack": check_attack,
    "inverter": check_inverter,
    "purifier": check_purifier,
}


def check_plugin(
    cls: type[Plugin],
    config: dict[str, Any] | None = None,
    spec: DataSpec = TINY_SPEC,
    device: torch.device | None = None,
) -> Any:
    """Run the check that fits the class's kind."""
    return CHECKS[cls.kind](cls, config=config, spec=spec, device=device)


def check_distribution(distribution: str) -> list[PluginInfo]:
    """The plugins an installed distribution registers, loaded through its entry points exactly
    as `bdtk` loads them; ConformanceError if it failed to load, lost a name clash, is turned off,
    or registers nothing (e.g. a misspelt entry-point group in its pyproject.toml).

    The public way for a plugin's own tests to prove that `pip install` makes it visible:
    `check_distribution("bdtk-clp")`.
    """
    wanted = normalize_name(distribution)
    registry = get_registry()
    problems = [
        f"{failure.plugin}: {failure.error}"
        for failure in registry.failures
        if normalize_name(failure.distribution) == wanted
    ]
    if problems:
        raise ConformanceError(f"distribution {distribution!r} did not load cleanly: " + "; ".join(problems))
    for skipped in registry.skipped:
        if normalize_name(skipped.distribution) == wanted:
            raise ConformanceError(
                f"distribution {distribution!r} is not loaded: turned off by {skipped.env}"
            )
    found = [
        info
        for kind in registry.qualified
        for info in registry.qualified[kind].values()
        if normalize_name(info.source.distribution) == wanted
    ]
    if not found:
        raise ConformanceError(
            f"distribution {distribution!r} registers no plugin: is it installed, and does its "
            "pyproject.toml declare an entry point in the `bdtk` group?"
        )
    return found
