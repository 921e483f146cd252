"""The shared setting of the benchmarks under benchmarks/: one place, so cached models are shared.

Fashion-MNIST with wrn-16-1, a 20,000-image stratified training subset and a 5,000-image test
subset keep a full attack × defense table within reach of a 2-core CPU; pass `--full` to a
benchmark script for the whole dataset. `bench_models` loads (or trains and caches) the models of
a setting with the defender's clean budget drawn for each, the same way for every script.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backdoor_toolkit import ImageClassifier, build_config, create_model, get_attack
from backdoor_toolkit.artifacts import ArtifactCache
from backdoor_toolkit.backdoor import _model_key, backdoored_model, clean_model
from backdoor_toolkit.cells import load_run_dataset
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.data import DefenseData, ImageData, budget_exclusions, draw_defense_data
from backdoor_toolkit.errors import UnknownNameError
from backdoor_toolkit.interfaces import Attack
from backdoor_toolkit.training import (
    LossFn,
    TrainingSettings,
    cross_entropy_loss,
    resolve_device,
    seed_everything,
    train_classifier,
)

#: What "all models" means to the scripts: the attacks of the inversion tables and the control.
DEFAULT_MODELS = ["badnets", "blended", "trojan", "clean"]


def bench_config(full: bool = False, **overrides: Any) -> BenchmarkConfig:
    """The benchmark setting, with field overrides (e.g. attacks=[...], defenses=[...])."""
    values: dict[str, Any] = {
        "dataset": "fashion-mnist",
        "model": "wrn-16-1",
        "train_size": None if full else 20000,
        "test_size": None if full else 5000,
        "training": {"epochs": 4, "batch_size": 128, "lr": 0.05},
        "clean_ratio": 0.05,
        "val_fraction": 0.2,
        "device": "auto",
    }
    values.update(overrides)
    return BenchmarkConfig.model_validate(values)


@dataclass
class BenchModel:
    """One model of a setting, with the defender's clean budget drawn for it (disjoint from the
    poisoned images) and the clean test set for evaluation only."""

    name: str  # the attack, or "clean"
    label: str
    model: ImageClassifier
    data: DefenseData
    test: ImageData
    attack: Attack | None
    device: torch.device

    @property
    def true_target(self) -> int | None:
        return None if self.attack is None else int(self.attack.config.target)


def bench_models(
    cfg: BenchmarkConfig, names: list[str], seed: int, cached_only: bool = False
) -> Iterator[BenchModel]:
    """The models `names` (attacks with their default configs, or "clean" for the control) of
    setting `cfg`, from the artifact cache or trained and cached on a miss. Unregistered attacks
    are skipped with a note; so is any model not yet cached when `cached_only` (no training)."""
    device = resolve_device(cfg.device)
    dataset = load_run_dataset(cfg)
    cache = ArtifactCache(Path(cfg.cache_dir) if cfg.cache_dir else None)

    def missing(attack: Attack | None) -> bool:
        # existence only: loading would verify (and, if mid-write by another process, remove) it
        paths = cache._paths(_model_key(dataset, cfg.model, attack, seed, cfg.training))
        if cached_only and not all(path.exists() for path in paths):
            print(f"skipping {attack.name if attack else 'clean'}: not in the cache {cache.root}", flush=True)
            return True
        return False

    for name in names:
        if name == "clean":
            if missing(None):
                continue
            model = clean_model(dataset, cfg.model, seed, cfg.training, device, cache)
            empty = torch.empty(0, dtype=torch.long)
            data = draw_defense_data(dataset, empty, cfg.clean_ratio, cfg.val_fraction, seed)
            yield BenchModel(name, "clean (no attack)", model, data, dataset.test, None, device)
            continue
        try:
            cls = get_attack(name)
        except UnknownNameError as exc:
            print(f"skipping {name}: {exc}", flush=True)
            continue
        attack = cls(build_config(cls.Config, {}, name), dataset.spec, seed=seed)  # type: ignore[arg-type]
        if missing(attack):
            continue
        victim = backdoored_model(dataset, cfg.model, attack, cfg.training, device, cache)
        excluded = budget_exclusions(victim.poisoned_index, attack.clean_label)
        data = draw_defense_data(dataset, excluded, cfg.clean_ratio, cfg.val_fraction, seed)
        yield BenchModel(name, name, victim.model, data, dataset.test, attack, device)


def budget_trained_model(
    m: BenchModel,
    seed: int,
    epochs: int,
    loss_fn: LossFn = cross_entropy_loss,
    model: ImageClassifier | None = None,
    lr: float = 0.05,
) -> ImageClassifier:
    """A wrn-16-1 trained from scratch on `m`'s defender budget (train part) only: the reference a
    defender could build from their own clean images (`loss_fn` e.g. distils the suspect instead).
    `model` is trained in place instead of a fresh one (its parameters without grad stay frozen)."""
    model = create_model("wrn-16-1", m.data.spec) if model is None else model
    settings = TrainingSettings(
        epochs=epochs, batch_size=64, lr=lr, weight_decay=5e-4, augment=True, hflip=False, device=m.device
    )
    seed_everything(seed)
    train_classifier(model, m.data.train.images, m.data.train.labels, settings, seed, loss_fn=loss_fn)
    return model.eval()


def named_bench_models(specs: list[str], cached_only: bool = False) -> Iterator[tuple[BenchModel, int]]:
    """The bench models named `ATTACK:SEED` (or `clean:SEED`; seed 0 when left out), each with its
    seed, trained on a cache miss, or (`cached_only`) skipped with a note."""
    for spec in specs:
        name, _, seed_text = spec.partition(":")
        seed = int(seed_text or 0)
        for m in bench_models(bench_config(), [name], seed, cached_only=cached_only):
            yield m, seed


def cached_bench_models(specs: list[str]) -> Iterator[tuple[BenchModel, int]]:
    """`named_bench_models` from the cache only: nothing is trained."""
    return named_bench_models(specs, cached_only=True)


def append_record(out: Path, record: dict[str, Any]) -> None:
    """Print one measurement as a JSON line and append it to `out`, so nothing is lost on a stop."""
    line = json.dumps(record)
    print(line, flush=True)
    with out.open("a") as fh:
        fh.write(line + "\n")
