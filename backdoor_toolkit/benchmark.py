"""The benchmark runner: a grid of datasets × models × attacks × seeds × defenses.

Everything is validated before any training starts. The grid is planned as backdoored models
(dataset, model, attack, seed), each shared by its cells: the undefended cell and one per
defense. An executor (local or Ray, see executors.py) runs the plan; each finished cell is
handed back at once (and written to the result store when one is given), so an interrupted run
loses at most the cells in flight, and a re-run skips the cells already stored. A cell that fails
is recorded as failed with its error and the grid carries on.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import platform
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from pydantic import BaseModel, Field
from rich.progress import Progress

from .artifacts import ArtifactCache
from .backdoor import BackdooredModel, backdoored_model
from .config import BenchmarkConfig, PluginChoice, config_hash, join_preset
from .console import console, progress
from .data import Dataset, DefenseData, dataset_spec, draw_defense_data, load_dataset, stratified_subset
from .errors import BdtkError, UnknownNameError
from .interfaces import Attack, AttackConfig, Purifier
from .metrics import Scores, attack_scores, der, measure
from .models import available_models, check_capabilities, create_model
from .plugins import PluginInfo, ResolvedPlugin, resolve_plugin
from .training import resolve_device, seed_everything

if TYPE_CHECKING:
    from .store import ResultStore


class Provenance(BaseModel):
    bdtk: str
    torch: str
    python: str
    device: str
    date: str
    attack_plugin: str
    defense_plugin: str | None


class CellResult(BaseModel):
    """One leaderboard row: an attack on a model, then one defense (or none), for one seed.

    `attack` and `defense` are plugin names; `attack_preset` and `defense_preset` the presets they
    were chosen with (None: none, as in every row stored before presets existed), and the configs
    are the resolved ones (defaults ⊕ preset ⊕ explicit values).
    """

    dataset: str
    model: str
    attack: str
    attack_preset: str | None = None
    attack_config: dict[str, Any]
    defense: str
    defense_preset: str | None = None
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
    setting: dict[str, Any] = Field(default_factory=dict)

    @property
    def attack_label(self) -> str:
        """`NAME` or `NAME:PRESET`: a preset is a different recipe, so tables name it."""
        return join_preset(self.attack, self.attack_preset)

    @property
    def defense_label(self) -> str:
        return join_preset(self.defense, self.defense_preset)


@dataclass
class _Resolved:
    attacks: list[ResolvedPlugin]
    defenses: list[ResolvedPlugin]


def _resolve(choices: list[PluginChoice], kind: Literal["attack", "purifier"]) -> list[ResolvedPlugin]:
    return [resolve_plugin(kind, choice.name, choice.preset, choice.config) for choice in choices]


def validate(config: BenchmarkConfig) -> _Resolved:
    """Check every name and config before anything runs; raise one clear BdtkError otherwise."""
    specs = [dataset_spec(name) for name in config.grid_datasets]
    known = [m.name for m in available_models()]
    for model in config.grid_models:
        if model not in known:
            raise UnknownNameError("model", model, known)
    resolved = _Resolved(_resolve(config.attacks, "attack"), _resolve(config.defenses, "purifier"))
    for spec in specs:
        for attack in resolved.attacks:
            # instantiating checks trigger parameters against the dataset
            _attack_class(attack.info)(cast(AttackConfig, attack.config), spec, seed=config.seeds[0])
    resolve_device(config.device)
    return resolved


def _attack_class(info: PluginInfo) -> type[Attack]:
    cls = info.cls
    assert issubclass(cls, Attack)
    return cls


def load_run_dataset(config: BenchmarkConfig, name: str | None = None) -> Dataset:
    """The run's dataset (or grid dataset `name`), reduced to `train_size`/`test_size` subsets."""
    dataset = load_dataset(name or config.dataset, config.data_dir, config.download)
    k = dataset.spec.num_classes
    return Dataset(
        dataset.spec,
        stratified_subset(dataset.train, config.train_size, k, seed=1),
        stratified_subset(dataset.test, config.test_size, k, seed=2),
    )


_DATASETS: dict[str, Dataset] = {}


def _grid_dataset(config: BenchmarkConfig, name: str) -> Dataset:
    """`load_run_dataset`, kept per process (a Ray worker runs many cells on the same data)."""
    key = config_hash([name, config.data_dir, config.train_size, config.test_size])
    if key not in _DATASETS:
        if len(_DATASETS) >= 2:
            _DATASETS.pop(next(iter(_DATASETS)))
        _DATASETS[key] = load_run_dataset(config, name)
    return _DATASETS[key]


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


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellPlan:
    """One cell of a backdoored model: no defense (None) or one defense, with its config hash."""

    defense: ResolvedPlugin | None
    config_hash: str

    @property
    def defense_name(self) -> str:
        return "none" if self.defense is None else self.defense.name

    @property
    def defense_label(self) -> str:
        return "none" if self.defense is None else self.defense.label


@dataclass(frozen=True)
class VictimPlan:
    """One backdoored model (dataset, model, attack, seed) and the cells that share it."""

    dataset: str
    model: str
    seed: int
    attack: ResolvedPlugin
    cells: tuple[CellPlan, ...]

    @property
    def label(self) -> str:
        return f"{self.attack.label} on {self.model}/{self.dataset} seed {self.seed}"

    def base(self) -> dict[str, Any]:
        """The fields every cell of this model shares (and its config hash covers).

        The preset is there only when one was chosen, so that cells without presets keep the
        hashes they had before presets existed and stored grids still resume.
        """
        base: dict[str, Any] = {
            "dataset": self.dataset,
            "model": self.model,
            "attack": self.attack.name,
            "attack_config": self.attack.config.model_dump(),
            "seed": self.seed,
        }
        if self.attack.preset is not None:
            base["attack_preset"] = self.attack.preset
        return base


def _defense_fields(defense: ResolvedPlugin) -> dict[str, Any]:
    """A defense cell's own fields: name, resolved config and (when chosen) preset."""
    fields: dict[str, Any] = {"defense": defense.name, "defense_config": defense.config.model_dump()}
    if defense.preset is not None:
        fields["defense_preset"] = defense.preset
    return fields


def run_setting(config: BenchmarkConfig) -> dict[str, Any]:
    """Everything besides a cell's own fields that determines its numbers."""
    return config.model_dump(include={"training", "train_size", "test_size", "clean_ratio", "val_fraction"})


def plan_grid(config: BenchmarkConfig, resolved: _Resolved | None = None) -> list[VictimPlan]:
    """Expand the grid into backdoored models, each with its undefended cell and defense cells."""
    resolved = resolved or validate(config)
    setting = run_setting(config)
    plans = []
    for dataset in config.grid_datasets:
        for model in config.grid_models:
            for seed in config.seeds:
                for attack in resolved.attacks:
                    plan = VictimPlan(dataset, model, seed, attack, ())
                    base = plan.base()
                    cells = [CellPlan(None, config_hash({**base, "defense": "none", **setting}))]
                    for defense in resolved.defenses:
                        cell = {**base, **_defense_fields(defense)}
                        cells.append(CellPlan(defense, config_hash({**cell, **setting})))
                    plans.append(dataclasses.replace(plan, cells=tuple(cells)))
    return plans


# --- the work (run by an executor, in this process or on a Ray worker) -----------------------


@dataclass
class VictimState:
    """A backdoored model as plain tensors, so it can travel to other processes and machines."""

    model_state: dict[str, torch.Tensor]
    trigger_state: dict[str, torch.Tensor]
    poisoned_index: torch.Tensor
    before: Scores
    train_seconds: float
    from_cache: bool


def prepare_victim(config: BenchmarkConfig, plan: VictimPlan) -> VictimState:
    """Train (or load from the artifact cache) the plan's backdoored model and score it."""
    dataset = _grid_dataset(config, plan.dataset)
    device = resolve_device(config.device)
    cache = ArtifactCache(Path(config.cache_dir) if config.cache_dir else None)
    attack = _attack_class(plan.attack.info)(
        cast(AttackConfig, plan.attack.config), dataset.spec, seed=plan.seed
    )
    victim = backdoored_model(dataset, plan.model, attack, config.training, device, cache)
    before = attack_scores(victim.model, dataset.test, attack.apply_trigger, attack.target_labels, device)
    return VictimState(
        {k: v.detach().cpu() for k, v in victim.model.state_dict().items()},
        {k: v.detach().cpu() for k, v in attack.trigger_state().items()},
        victim.poisoned_index.cpu(),
        before,
        victim.train_seconds,
        victim.from_cache,
    )


def _restore(config: BenchmarkConfig, plan: VictimPlan, state: VictimState) -> BackdooredModel:
    dataset = _grid_dataset(config, plan.dataset)
    attack = _attack_class(plan.attack.info)(
        cast(AttackConfig, plan.attack.config), dataset.spec, seed=plan.seed
    )
    attack.load_trigger_state(state.trigger_state)
    model = create_model(plan.model, dataset.spec)
    model.load_state_dict(state.model_state)
    device = resolve_device(config.device)
    return BackdooredModel(model.to(device).eval(), attack, state.poisoned_index, "", state.from_cache, 0.0)


def _cell_fields(config: BenchmarkConfig, plan: VictimPlan, cell: CellPlan) -> dict[str, Any]:
    fields = {**plan.base(), "defense": cell.defense_name, "config_hash": cell.config_hash}
    if cell.defense is not None:
        fields.update(_defense_fields(cell.defense))
    device = resolve_device(config.device)
    fields["provenance"] = _provenance(
        device, plan.attack.info, None if cell.defense is None else cell.defense.info
    )
    fields["setting"] = run_setting(config)
    return fields


def failed_cell(config: BenchmarkConfig, plan: VictimPlan, cell: CellPlan, exc: BaseException) -> CellResult:
    """The record of a cell that could not run: its error, and the tail of the traceback if unexpected."""
    if isinstance(exc, BdtkError):
        return CellResult(**_cell_fields(config, plan, cell), status="failed", error=str(exc))
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    console.print(f"[red]{cell.defense_label} against {plan.label} failed: {detail}[/]")
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3))
    return CellResult(**_cell_fields(config, plan, cell), status="failed", error=detail, notes=tb)


def run_cell(config: BenchmarkConfig, plan: VictimPlan, cell: CellPlan, state: VictimState) -> CellResult:
    """Evaluate one cell on the shared backdoored model; a failing defense gives a failed record."""
    fields = _cell_fields(config, plan, cell)
    if cell.defense is None:
        return CellResult(
            **fields,
            **state.before.model_dump(),
            seconds=state.train_seconds,
            notes="undefended" + (" (cached)" if state.from_cache else ""),
        )
    defense = cell.defense
    device = resolve_device(config.device)
    try:
        dataset = _grid_dataset(config, plan.dataset)
        victim = _restore(config, plan, state)
        data = draw_defense_data(
            dataset, state.poisoned_index, config.clean_ratio, config.val_fraction, plan.seed
        )
        pcls = defense.info.cls
        assert issubclass(pcls, Purifier)
        purifier = pcls(defense.config, seed=plan.seed, device=device)
        result, cost = run_defense(purifier, victim, data, device)
        attack = victim.attack
        after = attack_scores(result.model, dataset.test, attack.apply_trigger, attack.target_labels, device)
    except Exception as exc:  # a broken defense must not lose the rest of the grid
        return failed_cell(config, plan, cell, exc)
    return CellResult(
        **fields,
        **after.model_dump(),
        der=der(state.before, after),
        **cost,
        modified=result.modified,
        detected=result.detected,
        notes=result.notes,
        diagnostics=_jsonable(result.diagnostics),
        stage_seconds=result.stage_seconds,
    )


# --- the grid ---------------------------------------------------------------------------------

OnResult = Callable[[CellResult], None]


class GridProgress:
    """Overall and per-cell progress bars; the executor reports each start and each finished cell."""

    def __init__(self, bar: Progress, total: int, skipped: int, finish: OnResult) -> None:
        self._bar, self._finish = bar, finish
        note = f"{skipped} stored cells skipped" if skipped else ""
        self._overall = bar.add_task("grid", total=total, status=note)
        self._current = bar.add_task("cell", total=None, status="")

    def started(self, text: str) -> None:
        self._bar.update(self._current, description=text)

    def finished(self, row: CellResult) -> None:
        self._finish(row)
        mark = "[red]failed[/]" if row.status == "failed" else "done"
        self._bar.update(
            self._overall,
            advance=1,
            status=f"{row.defense_label} vs {row.attack_label} seed {row.seed}: {mark}",
        )


def run_benchmark(
    config: BenchmarkConfig,
    on_result: OnResult | None = None,
    *,
    store: ResultStore | None = None,
    force: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
) -> list[CellResult]:
    """Run the grid and return its rows in grid order.

    With a `store`, every finished cell is written to it at once and cells already stored (status
    ok, same config hash) are skipped unless `force`; their stored rows are returned too.
    `on_result` sees each freshly computed row.
    """
    from .executors import get_executor

    runner = get_executor(executor, ray_address)
    resolved = validate(config)
    for name in config.grid_datasets:  # missing data is an error now, not a failed cell per model
        _grid_dataset(config, name)
    plans = plan_grid(config, resolved)
    rows: dict[str, CellResult] = {}
    if store is not None and not force:
        stored = store.hashes("ok")
        for plan in plans:
            for cell in plan.cells:
                if cell.config_hash in stored:
                    row = store.get(cell.config_hash)
                    if row is not None:
                        rows[cell.config_hash] = row
    todo = [
        dataclasses.replace(plan, cells=tuple(c for c in plan.cells if c.config_hash not in rows))
        for plan in plans
    ]
    todo = [plan for plan in todo if plan.cells]
    total = sum(len(plan.cells) for plan in todo)
    if rows:
        console.print(
            f"{len(rows)} cells already in {store.path if store else ''}; skipping them (--force reruns)."
        )

    def finish(row: CellResult) -> None:
        if store is not None:
            store.put(row)
        rows[row.config_hash] = row
        if on_result is not None:
            on_result(row)

    if todo:
        with progress() as bar:
            runner.run(config, todo, GridProgress(bar, total, len(rows), finish))
    return [rows[c.config_hash] for plan in plans for c in plan.cells if c.config_hash in rows]


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
