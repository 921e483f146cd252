"""Training backdoored (and clean) models, cached by the hash of everything that determines them.

The cache key covers the data, model, seed and training settings, and also the code and runtime
that produced the weights: bdtk's version, the attack plugin's distribution and version, and the
torch thread count (training results differ between thread counts). A model is therefore
retrained when any of them changes rather than silently reused.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from .artifacts import ArtifactCache, non_finite
from .config import TrainingConfig, config_hash
from .console import console
from .data import Dataset
from .errors import BdtkError
from .interfaces import Attack, AttackContext, TrainingSettings
from .models import ImageClassifier, create_model
from .plugins import get_plugin, get_registry
from .training import seed_everything, train_classifier

#: Bump when the key payload or the meaning of a cache entry changes: old entries are then unused.
#: 3: training runs in the device's preferred memory layout (weights differ in the last bits).
CACHE_FORMAT = 3
#: Why a cache hit can be unusable although its checksum holds (e.g. a plugin changed its trigger
#: shapes without a new version): load_state_dict and load_trigger_state raise these.
_UNFIT = (RuntimeError, KeyError, ValueError, TypeError, IndexError)


@dataclass
class BackdooredModel:
    model: ImageClassifier
    attack: Attack
    poisoned_index: torch.Tensor
    cache_key: str
    from_cache: bool
    train_seconds: float


@lru_cache(maxsize=1)
def bdtk_version() -> str:
    """The installed backdoor-toolkit version ("unknown" when running from an uninstalled tree)."""
    try:
        return version("backdoor-toolkit")
    except PackageNotFoundError:
        return "unknown"


def _attack_provenance(attack: Attack) -> dict[str, str]:
    """The distribution and version that registered the attack's class, as the registry records
    them (e.g. "(in-process)" for a class registered directly), so a new plugin release retrains;
    "(unregistered)" for a class the registry does not hold."""
    cls = type(attack)
    where = f"{cls.__module__}.{cls.__qualname__}"
    try:
        infos = [get_plugin("attack", attack.name)]
        if infos[0].cls is not cls:  # e.g. a class that lost a name clash: look for it by identity
            registry = get_registry()
            infos = [*registry.all(), *getattr(registry, "qualified", {}).get("attack", {}).values()]
    except BdtkError:
        infos = []
    for info in infos:
        if info.kind == "attack" and info.cls is cls:
            return {"distribution": info.source.distribution, "version": info.source.version, "class": where}
    return {"distribution": "(unregistered)", "version": "", "class": where}


def _model_key(
    dataset: Dataset,
    model_name: str,
    attack: Attack | None,
    seed: int,
    cfg: TrainingConfig,
    *,
    threads: int | None = None,
) -> str:
    """The cache key of a model; `threads` defaults to the torch threads that would train it now."""
    payload: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "bdtk": bdtk_version(),
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "dataset": dataset.spec.name,
        "train_size": len(dataset.train),
        "model": model_name,
        "seed": seed,
        "training": cfg.model_dump(),
        "attack": None
        if attack is None
        else {
            "name": attack.name,
            "config": attack.config.model_dump(),
            "plugin": _attack_provenance(attack),
        },
    }
    kind = "clean" if attack is None else attack.name
    return f"{kind}-{model_name}-{dataset.spec.name}-{config_hash(payload)}"


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to cache a diverged model: one clear error now rather than NaN results in every later
    run that would load it."""
    bad = non_finite(tensors)
    if bad is not None:
        raise BdtkError(
            f"training {what} produced non-finite weights (NaN/inf in {bad}) — lower the learning "
            "rate or weight decay"
        )


def _restore_trigger(attack: Attack, state: dict[str, torch.Tensor]) -> None:
    """Load a cached trigger state, leaving `attack` untouched when it does not fit.

    Tried on a copy first: a plugin may fail half-way (one of two nets loaded), and the attack then
    has to train from its pristine state.
    """
    try:
        probe = copy.deepcopy(attack)
    except Exception:  # an attack that cannot be copied is loaded directly
        probe = None
    if probe is not None:
        probe.load_trigger_state(state)
    attack.load_trigger_state(state)


def clean_model(
    dataset: Dataset,
    model_name: str,
    seed: int,
    cfg: TrainingConfig,
    device: torch.device,
    cache: ArtifactCache,
) -> ImageClassifier:
    """A model trained without any attack, e.g. for Trojan's neuron selection or as a control."""
    key = _model_key(dataset, model_name, None, seed, cfg)
    hit = cache.load(key)
    seed_everything(seed)
    model = create_model(model_name, dataset.spec)
    if hit is not None:
        try:
            model.load_state_dict(hit[0])
        except _UNFIT as exc:
            cache.discard(key, f"its tensors do not fit {model_name}: {_first_line(exc)}")
            seed_everything(seed)
            model = create_model(model_name, dataset.spec)
        else:
            return model.to(device).eval()
    settings = TrainingSettings.from_config(cfg, dataset.spec, device)
    train_classifier(
        model, dataset.train.images, dataset.train.labels, settings, seed, description="clean model"
    )
    state = model.state_dict()
    _check_finite(state, "the clean model")
    meta = {"dataset": dataset.spec.name, "model": model_name, "seed": seed}
    meta.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), bdtk=bdtk_version())
    cache.save(key, state, meta)
    return model.eval()


def backdoored_model(
    dataset: Dataset,
    model_name: str,
    attack: Attack,
    cfg: TrainingConfig,
    device: torch.device,
    cache: ArtifactCache,
) -> BackdooredModel:
    """Load the backdoored model for (dataset, model, attack, seed, training) or train and cache it.

    The cache entry holds the weights, the attack's trigger state and the poisoned indices, so a
    cache hit measures ASR with exactly the trigger the model was trained on.
    """
    seed = attack.seed
    key = _model_key(dataset, model_name, attack, seed, cfg)
    hit = cache.load(
        key, require_metadata={"train_seconds": (int, float)}, require_tensors=["poisoned_index"]
    )
    if hit is not None:
        cached = _from_cache(key, hit, dataset, model_name, attack, device, cache)
        if cached is not None:
            return cached
    start = time.perf_counter()
    settings = TrainingSettings.from_config(cfg, dataset.spec, device)
    context = AttackContext(
        spec=dataset.spec,
        train=dataset.train,
        model_name=model_name,
        settings=settings,
        clean_model=lambda: clean_model(dataset, model_name, seed, cfg, device, cache),
    )
    seed_everything(seed)
    attack.prepare(context)
    poisoned = attack.poison_training_set(dataset.train)
    seed_everything(seed)
    model = create_model(model_name, dataset.spec)
    console.print(f"Training {model_name} on {dataset.spec.name} poisoned by {attack.name} (seed {seed})")
    attack.fit(model, poisoned, settings)
    seconds = time.perf_counter() - start
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"trigger.{k}": v for k, v in attack.trigger_state().items()})
    tensors["poisoned_index"] = poisoned.poisoned_index
    _check_finite(tensors, f"the model backdoored by {attack.name}")
    cache.save(
        key,
        tensors,
        {
            "dataset": dataset.spec.name,
            "model": model_name,
            "attack": attack.name,
            "attack_config": attack.config.model_dump(),
            "seed": seed,
            "training": cfg.model_dump(),
            "train_seconds": seconds,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "bdtk": bdtk_version(),
            "plugin": _attack_provenance(attack),
        },
    )
    return BackdooredModel(model.eval(), attack, poisoned.poisoned_index, key, False, seconds)


def _from_cache(
    key: str,
    hit: tuple[dict[str, torch.Tensor], dict[str, Any]],
    dataset: Dataset,
    model_name: str,
    attack: Attack,
    device: torch.device,
    cache: ArtifactCache,
) -> BackdooredModel | None:
    """The cached backdoored model, or None (entry discarded) when its tensors do not fit."""
    tensors, meta = hit
    model = create_model(model_name, dataset.spec)
    try:
        model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_trigger(
            attack, {k[len("trigger.") :]: v for k, v in tensors.items() if k.startswith("trigger.")}
        )
    except _UNFIT as exc:
        cache.discard(key, f"its tensors do not fit {model_name}/{attack.name}: {_first_line(exc)}")
        return None
    return BackdooredModel(
        model.to(device).eval(), attack, tensors["poisoned_index"], key, True, float(meta["train_seconds"])
    )


def _first_line(exc: BaseException, limit: int = 240) -> str:
    """The error on one short line (load_state_dict spreads its reasons over several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
