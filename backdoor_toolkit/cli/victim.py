"""The backdoored model a command names by attack and setting (`bdtk attack` and `bdtk inspect` share
it), and its export as a victim folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..artifacts import ArtifactCache
from ..backdoor import BackdooredModel, backdoored_model, bdtk_version
from ..cells import load_run_dataset, validate
from ..config import BenchmarkConfig, build_config
from ..data import Dataset, budget_exclusions, to_float
from ..interfaces import Attack
from ..plugins import create_attack
from ..training import resolve_device
from ..victims import BackdoorTestSet, save_victim


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


def export_victim(
    out: Path, cfg: BenchmarkConfig, data: Dataset, attack: Attack, victim: BackdooredModel, force: bool
) -> tuple[str, BackdoorTestSet]:
    """Write the backdoored model as a victim folder (`bdtk purify DIR`, `bdtk benchmark --victim DIR`).

    The backdoored test set is every non-target test image with the trigger stamped, stored as 8-bit
    images (what a PNG of it would hold), so ASR measured on the folder can differ from the
    float-trigger ASR by the rounding of faint triggers. The attacker's poisoned training images
    are recorded as excluded, so a defender's budget drawn from the folder is clean.
    """
    targets = attack.target_labels(data.test.labels)
    keep = targets != data.test.labels
    index = torch.nonzero(keep).squeeze(1)
    stamped = []
    with torch.no_grad():
        for start in range(0, index.numel(), 512):
            batch = to_float(data.test.images[index[start : start + 512]])
            stamped.append((attack.apply_trigger(batch).clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    bd_test = BackdoorTestSet(torch.cat(stamped), targets[keep], data.test.labels[keep], index)
    chosen = cfg.attacks[0]
    source = {
        "tool": "bdtk attack",
        "bdtk": bdtk_version(),
        "attack": chosen.label,
        "attack_config": attack.config.model_dump(mode="json"),
        "dataset": cfg.dataset,
        "train_size": cfg.train_size,
        "test_size": cfg.test_size,
        "training": cfg.training.model_dump(mode="json"),
        "seed": cfg.seeds[0],
        "targets": sorted({int(t) for t in bd_test.targets.tolist()}),
        "cache_key": victim.cache_key,
        "bd_test": "every non-target test image, trigger stamped, rounded to 8 bits",
    }
    content_hash = save_victim(
        out,
        name=f"{chosen.label}-{cfg.model}-{cfg.dataset}-seed{cfg.seeds[0]}",
        model_name=cfg.model,
        model=victim.model,
        spec=data.spec,
        clean_train=data.train,
        excluded=budget_exclusions(victim.poisoned_index, victim.attack.clean_label).long().cpu(),
        clean_test=data.test,
        bd_test=bd_test,
        source=source,
        force=force,
    )
    return content_hash, bd_test
