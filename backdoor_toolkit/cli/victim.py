"""The backdoored model a command names by attack and setting: `bdtk attack` and `bdtk inspect` share it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifacts import ArtifactCache
from ..backdoor import BackdooredModel, backdoored_model
from ..cells import load_run_dataset, validate
from ..config import BenchmarkConfig, build_config
from ..data import Dataset
from ..interfaces import Attack
from ..plugins import create_attack
from ..training import resolve_device


def victim_config(
    command: str, attack: str | None, settings: dict[str, Any], epochs: int | None, **fields: Any
) -> BenchmarkConfig:
    """A one-attack, no-defense BenchmarkConfig from a command's options (validated, clear errors).

    Without an attack (`bdtk inspect MODEL_FILE`) the config only names the data, the clean budget
    and the device; its `attacks` keep their default and must not be read.
    """
    values: dict[str, Any] = {**fields, "defenses": []}
    if attack is not None:
        values["attacks"] = [{"name": attack, "config": settings}]
    if epochs is not None:
        values["training"] = {"epochs": epochs}
    return build_config(BenchmarkConfig, values, command)


def load_victim(cfg: BenchmarkConfig) -> tuple[Dataset, Attack, BackdooredModel]:
    """The run's dataset, its attack, and the backdoored model (from the cache, or trained on a miss)."""
    (chosen,) = validate(cfg).attacks
    data = load_run_dataset(cfg)
    attack = create_attack(chosen, spec=data.spec, seed=cfg.seeds[0])
    cache = ArtifactCache(Path(cfg.cache_dir) if cfg.cache_dir else None)
    victim = backdoored_model(data, cfg.model, attack, cfg.training, resolve_device(cfg.device), cache)
    return data, attack, victim
