"""Training backdoored (and clean) models, cached by the hash of everything that determines them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .artifacts import ArtifactCache
from .config import TrainingConfig, config_hash
from .console import console
from .data import Dataset
from .interfaces import Attack, AttackContext, TrainingSettings
from .models import ImageClassifier, create_model
from .training import seed_everything, train_classifier

CACHE_FORMAT = 1


@dataclass
class BackdooredModel:
    model: ImageClassifier
    attack: Attack
    poisoned_index: torch.Tensor
    cache_key: str
    from_cache: bool
    train_seconds: float


def _model_key(
    dataset: Dataset, model_name: str, attack: Attack | None, seed: int, cfg: TrainingConfig
) -> str:
    payload: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "dataset": dataset.spec.name,
        "train_size": len(dataset.train),
        "model": model_name,
        "seed": seed,
        "training": cfg.model_dump(),
        "attack": None if attack is None else {"name": attack.name, "config": attack.config.model_dump()},
    }
    kind = "clean" if attack is None else attack.name
    return f"{kind}-{model_name}-{dataset.spec.name}-{config_hash(payload)}"


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
        model.load_state_dict(hit[0])
        return model.to(device).eval()
    settings = TrainingSettings.from_config(cfg, dataset.spec, device)
    train_classifier(
        model, dataset.train.images, dataset.train.labels, settings, seed, description="clean model"
    )
    cache.save(key, model.state_dict(), {"dataset": dataset.spec.name, "model": model_name, "seed": seed})
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
    hit = cache.load(key)
    if hit is not None:
        tensors, meta = hit
        model = create_model(model_name, dataset.spec)
        model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        attack.load_trigger_state(
            {k[len("trigger.") :]: v for k, v in tensors.items() if k.startswith("trigger.")}
        )
        return BackdooredModel(
            model.to(device).eval(),
            attack,
            tensors["poisoned_index"],
            key,
            True,
            float(meta["train_seconds"]),
        )
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
        },
    )
    return BackdooredModel(model.eval(), attack, poisoned.poisoned_index, key, False, seconds)
