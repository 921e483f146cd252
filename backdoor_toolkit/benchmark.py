"""The benchmark runner: for each (attack, seed) a backdoored model, then every defense on it.

Everything is validated before any training starts. Each finished cell is written to the results
file at once, so an interrupted run loses at most the cell in flight; a defense that fails is
recorded as failed with its error and the run carries on.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import platform
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, Field

from .artifacts import ArtifactCache
from .backdoor import BackdooredModel, backdoored_model
from .config import BenchmarkConfig, PluginChoice, StrictConfig, build_config, config_hash
from .console import console
from .data import Dataset, DefenseData, dataset_spec, draw_defense_data, load_dataset, stratified_subset
from .errors import BdtkError
from .interfaces import Attack, AttackConfig, Purifier
from .metrics import attack_scores, der, measure
from .models import available_models, check_capabilities
from .plugins import PluginInfo, get_plugin
from .training import resolve_device, seed_everything


class Provenance(BaseModel):
    bdtk: str
    torch: str
    python: str
    device: str
    date: str
    attack_plugin: str
    defense_plugin: str | None


class CellResult(BaseModel):
    """One leaderboard row: an attack on a model, then one defense (or none), for one seed."""

    dataset: str
    model: str
    attack: str
    attack_config: dict[str, Any]
    defense: str
    defense_config: dict[str, Any] = Field(default_factory=dict)
    seed: int
    status: Literal["ok", "failed"] = "ok"
    error: str = ""
    ba: float | None = None
    asr: float | None = None
    ra: float | None = None
    der: float | None = None
    seconds: float | None = None
    peak_mb: float | None = None
    modified: bool | None = None
    detected: bool | None = None
    notes: str = ""
    diagnostics: dict[str, Any] = Field(default_factory=dict)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    config_hash: str
    provenance: Provenance


@dataclass
class _Resolved:
    attacks: list[tuple[PluginInfo, StrictConfig]]
    defenses: list[tuple[PluginInfo, StrictConfig]]


def _resolve(
    choices: list[PluginChoice], kind: Literal["attack", "purifier"]
) -> list[tuple[PluginInfo, StrictConfig]]:
    out = []
    for choice in choices:
        info = get_plugin(kind, choice.name)
        out.append((info, build_config(info.cls.Config, choice.config, f"{kind} {choice.name!r}")))
    return out


def validate(config: BenchmarkConfig) -> _Resolved:
    """Check every name and config before anything runs; raise one clear BdtkError otherwise."""
    spec = dataset_spec(config.dataset)
    if config.model not in {m.name for m in available_models()}:
        from .errors import UnknownNameError

        raise UnknownNameError("model", config.model, [m.name for m in available_models()])
    resolved = _Resolved(_resolve(config.attacks, "attack"), _resolve(config.defenses, "purifier"))
    for info, cfg in resolved.attacks:
        cls = info.cls
        assert issubclass(cls, Attack)
        # instantiating checks trigger parameters against the dataset
        cls(cast(AttackConfig, cfg), spec, seed=config.seeds[0])
    resolve_device(config.device)
    return resolved


def load_run_dataset(config: BenchmarkConfig) -> Dataset:
    """The run's dataset, reduced to `train_size`/`test_size` stratified subsets when asked."""
    dataset = load_dataset(config.dataset, config.data_dir, config.download)
    k = dataset.spec.num_classes
    return Dataset(
        dataset.spec,
        stratified_subset(dataset.train, config.train_size, k, seed=1),
        stratified_subset(dataset.test, config.test_size, k, seed=2),
    )


def _provenance(device: torch.device, attack: PluginInfo, defense: PluginInfo | None) -> Provenance:
    return Provenance(
        bdtk=version("backdoor-toolkit"),
        torch=torch.__version__,
        python=platform.python_version(),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        attack_plugin=f"{attack.source.distribution} {attack.source.version}",
        defense_plugin=None if defense is None else f"{defense.source.distribution} {defense.source.version}",
    )


def run_defense(
    purifier: Purifier, victim: BackdooredModel, data: DefenseData, device: torch.device
) -> tuple[Any, dict[str, Any]]:
    """Purify a copy of the victim (the cached original stays untouched) and measure the cost."""
    check_capabilities(victim.model, purifier.meta.requires, f"Defense {purifier.name!r}")
    model = copy.deepcopy(victim.model).to(device)
    seed_everything(purifier.seed)
    with measure(device) as usage:
        result = purifier.purify(model, data)
    return result, {"seconds": usage.seconds, "peak_mb": usage.peak_mb}


OnResult = Callable[[CellResult], None]


def run_benchmark(config: BenchmarkConfig, on_result: OnResult | None = None) -> list[CellResult]:
    """Run every (attack × seed) with no defense and each defense; return the rows."""
    resolved = validate(config)
    device = resolve_device(config.device)
    dataset = load_run_dataset(config)
    cache = ArtifactCache(Path(config.cache_dir) if config.cache_dir else None)
    results: list[CellResult] = []

    def emit(row: CellResult) -> None:
        results.append(row)
        if on_result is not None:
            on_result(row)

    for seed in config.seeds:
        for attack_info, attack_cfg in resolved.attacks:
            for row in _run_attack(config, dataset, cache, device, seed, attack_info, attack_cfg, resolved):
                emit(row)
    return results


def _run_attack(
    config: BenchmarkConfig,
    dataset: Dataset,
    cache: ArtifactCache,
    device: torch.device,
    seed: int,
    attack_info: PluginInfo,
    attack_cfg: StrictConfig,
    resolved: _Resolved,
) -> Iterator[CellResult]:
    """Yield the undefended row and then one row per defense, each as soon as it is done."""
    cls = attack_info.cls
    assert issubclass(cls, Attack)
    attack = cls(cast(AttackConfig, attack_cfg), dataset.spec, seed=seed)
    victim = backdoored_model(dataset, config.model, attack, config.training, device, cache)
    before = attack_scores(victim.model, dataset.test, attack.apply_trigger, attack.target_labels, device)
    base: dict[str, Any] = {
        "dataset": config.dataset,
        "model": config.model,
        "attack": attack.name,
        "attack_config": attack_cfg.model_dump(),
        "seed": seed,
    }
    # everything besides the cell's own fields that determines its numbers
    setting = config.model_dump(
        include={"training", "train_size", "test_size", "clean_ratio", "val_fraction"}
    )
    yield CellResult(
        **base,
        defense="none",
        **before.model_dump(),
        seconds=victim.train_seconds,
        notes="undefended" + (" (cached)" if victim.from_cache else ""),
        config_hash=config_hash({**base, "defense": "none", **setting}),
        provenance=_provenance(device, attack_info, None),
    )
    data = draw_defense_data(dataset, victim.poisoned_index, config.clean_ratio, config.val_fraction, seed)
    for defense_info, defense_cfg in resolved.defenses:
        cell: dict[str, Any] = {
            **base,
            "defense": defense_info.name,
            "defense_config": defense_cfg.model_dump(),
        }
        cell_hash = config_hash({**cell, **setting})
        provenance = _provenance(device, attack_info, defense_info)
        console.print(f"Defense {defense_info.name} against {attack.name} (seed {seed})")
        try:
            pcls = defense_info.cls
            assert issubclass(pcls, Purifier)
            purifier = pcls(defense_cfg, seed=seed, device=device)
            result, cost = run_defense(purifier, victim, data, device)
            after = attack_scores(
                result.model, dataset.test, attack.apply_trigger, attack.target_labels, device
            )
        except BdtkError as exc:
            yield CellResult(
                **cell, status="failed", error=str(exc), config_hash=cell_hash, provenance=provenance
            )
            continue
        except Exception as exc:  # a broken defense must not lose the rest of the grid
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            console.print(f"[red]Defense {defense_info.name} failed: {detail}[/]")
            yield CellResult(
                **cell,
                status="failed",
                error=detail,
                notes=traceback.format_exc(limit=-3),
                config_hash=cell_hash,
                provenance=provenance,
            )
            continue
        yield CellResult(
            **cell,
            **after.model_dump(),
            der=der(before, after),
            **cost,
            modified=result.modified,
            detected=result.detected,
            notes=result.notes,
            diagnostics=_jsonable(result.diagnostics),
            stage_seconds=result.stage_seconds,
            config_hash=cell_hash,
            provenance=provenance,
        )


def _jsonable(value: Any) -> Any:
    """Diagnostics as plain JSON (tensors become lists)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_results(path: Path, config: BenchmarkConfig, rows: list[CellResult]) -> None:
    """Write (atomically) the run's config and rows as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": config.model_dump(), "results": [r.model_dump() for r in rows]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
