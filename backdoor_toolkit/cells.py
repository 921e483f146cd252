"""The plan of a grid and its unit of work: one backdoored model, and one cell on it.

`validate` checks every name and config before anything runs; `plan_grid` expands a
`BenchmarkConfig` into `VictimPlan`s (dataset, model, attack, seed), each with its `CellPlan`s
(undefended, then one per defense) and their config hashes, the identity a store resumes by.
`prepare_victim` and `run_cell` are the work an executor runs, in this process or on a Ray
worker; they take and return plain values so they travel between processes.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import platform
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from .artifacts import ArtifactCache
from .backdoor import BackdooredModel, backdoored_model, bdtk_version, clean_model
from .config import BenchmarkConfig, PluginChoice, config_hash, hashed_config, validation_message
from .console import console
from .data import (
    Dataset,
    DefenseData,
    budget_exclusions,
    dataset_spec,
    draw_defense_data,
    load_dataset,
    stratified_subset,
)
from .errors import BdtkError, UnknownNameError
from .interfaces import Attack, Purifier
from .metrics import Scores, attack_scores, der, measure
from .models import available_models, check_capabilities, create_model
from .plugins import PluginInfo, ResolvedPlugin, create_attack, create_purifier, resolve_plugin
from .results import CLEAN_MODEL, SCHEMA_VERSION, UNDEFENDED, CellResult, Provenance, jsonable
from .retuning import retune_attack
from .training import check_finite, resolve_device, seed_everything, torch_threads


@dataclass
class ResolvedGrid:
    attacks: list[ResolvedPlugin]
    defenses: list[ResolvedPlugin]


def _resolve(choices: list[PluginChoice], kind: Literal["attack", "purifier"]) -> list[ResolvedPlugin]:
    return [resolve_plugin(kind, choice.name, choice.preset, choice.config) for choice in choices]


def validate(config: BenchmarkConfig) -> ResolvedGrid:
    """Check every name and config before anything runs; raise one clear BdtkError otherwise."""
    specs = [dataset_spec(name) for name in config.grid_datasets]
    known = [m.name for m in available_models()]
    for model in config.grid_models:
        if model not in known:
            raise UnknownNameError("model", model, known)
    resolved = ResolvedGrid(_resolve(config.attacks, "attack"), _resolve(config.defenses, "purifier"))
    for spec in specs:
        for attack in resolved.attacks:
            # instantiating checks trigger parameters against the dataset
            create_attack(attack, spec=spec, seed=config.seeds[0])
    for defense in resolved.defenses:
        # instantiating resolves what a defense's config names (MCLDef's inverters) before any training
        create_purifier(defense, seed=config.seeds[0])
    resolve_device(config.device)
    return resolved


#: Seeds of the class-stratified `train_size` / `test_size` subsets of a run's dataset, so a
#: script can name the images a run leaves out (benchmarks/recipe.py's development split).
TRAIN_SUBSET_SEED, TEST_SUBSET_SEED = 1, 2


def load_run_dataset(config: BenchmarkConfig, name: str | None = None) -> Dataset:
    """The run's dataset (or grid dataset `name`), reduced to `train_size`/`test_size` subsets."""
    dataset = load_dataset(name or config.dataset, config.data_dir, config.download)
    k, of = dataset.spec.num_classes, dataset.spec.name
    return Dataset(
        dataset.spec,
        stratified_subset(
            dataset.train,
            config.train_size,
            k,
            seed=TRAIN_SUBSET_SEED,
            what="--train-size",
            split=f"training images of {of}",
        ),
        stratified_subset(
            dataset.test,
            config.test_size,
            k,
            seed=TEST_SUBSET_SEED,
            what="--test-size",
            split=f"test images of {of}",
        ),
    )


_DATASETS: dict[str, Dataset] = {}


def grid_dataset(config: BenchmarkConfig, name: str) -> Dataset:
    """`load_run_dataset`, kept per process (a Ray worker runs many cells on the same data)."""
    key = config_hash([name, config.data_dir, config.train_size, config.test_size])
    if key not in _DATASETS:
        if len(_DATASETS) >= 2:
            _DATASETS.pop(next(iter(_DATASETS)))
        _DATASETS[key] = load_run_dataset(config, name)
    return _DATASETS[key]


def _provenance(device: torch.device, attack: PluginInfo, defense: PluginInfo | None) -> Provenance:
    return Provenance(
        bdtk=bdtk_version(),
        torch=torch.__version__,
        python=platform.python_version(),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        attack_plugin=f"{attack.source.distribution} {attack.source.version}",
        defense_plugin=None if defense is None else f"{defense.source.distribution} {defense.source.version}",
        threads=torch.get_num_threads(),
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
    clean_reference: bool = False  # the never-backdoored model of the setting, shown the trigger

    @property
    def defense_name(self) -> str:
        if self.clean_reference:
            return CLEAN_MODEL
        return UNDEFENDED if self.defense is None else self.defense.name

    @property
    def defense_label(self) -> str:
        return self.defense_name if self.defense is None else self.defense.label


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
        hashes they had before presets existed and stored grids still resume. A clean-label
        attack's cells name the budget rule (`data.budget_exclusions`), so cells drawn under the
        earlier rule, which avoided its poisoned images, are never resumed as if current.
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
        if getattr(self.attack.info.cls, "clean_label", False):
            base["defense_budget"] = "clean originals of poisoned images included"
        return base


def defense_fields(defense: ResolvedPlugin, for_hash: bool = False) -> dict[str, Any]:
    """A defense cell's own fields: name, resolved config and (when chosen) preset. `for_hash`:
    the config as a cell's identity sees it (`hashed_config`: added fields at their default left
    out), for grids and stored victims alike; a stored row keeps the full config."""
    config = hashed_config(defense.config) if for_hash else defense.config.model_dump()
    fields: dict[str, Any] = {"defense": defense.name, "defense_config": config}
    if defense.preset is not None:
        fields["defense_preset"] = defense.preset
    return fields


def code_version(plugin: ResolvedPlugin) -> str:
    """`DISTRIBUTION VERSION` of the code behind a plugin: part of a cell's identity, so a new
    release of a plugin (or of bdtk, for the built-in ones) recomputes its cells on resume instead
    of mixing old numbers with the new code's."""
    return f"{plugin.info.source.distribution} {plugin.info.source.version}"


def run_setting(config: BenchmarkConfig) -> dict[str, Any]:
    """Everything besides a cell's own fields that determines its numbers.

    The re-tuning attack is there only when it is on, so that grids without it keep the hashes
    they had before it existed and stored grids still resume.
    """
    setting = config.model_dump(
        include={"training", "train_size", "test_size", "clean_ratio", "val_fraction", "threads"}
    )
    if config.retune is not None:
        setting["retune"] = config.retune.model_dump()
    return setting


def plan_grid(config: BenchmarkConfig, resolved: ResolvedGrid | None = None) -> list[VictimPlan]:
    """Expand the grid into backdoored models, each with its undefended cell and defense cells."""
    resolved = resolved or validate(config)
    setting = run_setting(config)
    plans = []
    for dataset in config.grid_datasets:
        for model in config.grid_models:
            for seed in config.seeds:
                for attack in resolved.attacks:
                    plan = VictimPlan(dataset, model, seed, attack, ())
                    base = {
                        **plan.base(),
                        "attack_config": hashed_config(attack.config),
                        "code": {"attack": code_version(attack)},
                    }
                    cells = [CellPlan(None, config_hash({**base, "defense": UNDEFENDED, **setting}))]
                    if config.clean_reference:
                        reference = config_hash({**base, "defense": CLEAN_MODEL, **setting})
                        cells.append(CellPlan(None, reference, clean_reference=True))
                    for defense in resolved.defenses:
                        cell = {**base, **defense_fields(defense, for_hash=True)}
                        cell["code"] = {**base["code"], "defense": code_version(defense)}
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
    with torch_threads(config.threads):
        return _prepare_victim(config, plan)


def _prepare_victim(config: BenchmarkConfig, plan: VictimPlan) -> VictimState:
    dataset = grid_dataset(config, plan.dataset)
    device = resolve_device(config.device)
    cache = ArtifactCache(Path(config.cache_dir) if config.cache_dir else None)
    attack = create_attack(plan.attack, spec=dataset.spec, seed=plan.seed)
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


def _restore_attack(config: BenchmarkConfig, plan: VictimPlan, state: VictimState) -> Attack:
    """The plan's attack with the trigger state its backdoored model was trained against."""
    attack = create_attack(plan.attack, spec=grid_dataset(config, plan.dataset).spec, seed=plan.seed)
    attack.load_trigger_state(state.trigger_state)
    return attack


def _defense_budget(
    config: BenchmarkConfig, plan: VictimPlan, dataset: Dataset, state: VictimState, attack: Attack
) -> DefenseData:
    """The defender's clean budget of a victim: the same draw for its defense and its re-tuning."""
    excluded = budget_exclusions(state.poisoned_index, attack.clean_label)
    return draw_defense_data(dataset, excluded, config.clean_ratio, config.val_fraction, plan.seed)


def _restore(config: BenchmarkConfig, plan: VictimPlan, state: VictimState) -> BackdooredModel:
    dataset = grid_dataset(config, plan.dataset)
    attack = _restore_attack(config, plan, state)
    model = create_model(plan.model, dataset.spec)
    model.load_state_dict(state.model_state)
    device = resolve_device(config.device)
    return BackdooredModel(model.to(device).eval(), attack, state.poisoned_index, "", state.from_cache, 0.0)


def _cell_fields(config: BenchmarkConfig, plan: VictimPlan, cell: CellPlan) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        **plan.base(),
        "defense": cell.defense_name,
        "config_hash": cell.config_hash,
    }
    if cell.defense is not None:
        fields.update(defense_fields(cell.defense))
    device = resolve_device(config.device)
    fields["provenance"] = _provenance(
        device, plan.attack.info, None if cell.defense is None else cell.defense.info
    )
    fields["setting"] = run_setting(config)
    return fields


def failed_cell(config: BenchmarkConfig, plan: VictimPlan, cell: CellPlan, exc: BaseException) -> CellResult:
    """The record of a cell that could not run: its error, and the tail of the traceback if unexpected."""
    fields = {**_cell_fields(config, plan, cell), **_retune_skipped(config, "the cell failed")}
    return failed_record(fields, f"{cell.defense_label} against {plan.label}", exc)


def failed_record(fields: dict[str, Any], what: str, exc: BaseException) -> CellResult:
    """A failed CellResult from a cell's `fields`: bdtk's own errors as they stand (with the tail of
    the traceback of a non-bdtk error they were raised from); anything else (a plugin's bug, or its
    sys.exit) in one line, reported as `what … failed`, with the traceback's tail kept in the notes."""
    if isinstance(exc, BdtkError):
        cause = exc.__cause__
        if cause is None or isinstance(cause, BdtkError):
            return CellResult(**fields, status="failed", error=str(exc))
        # bdtk's message naming where a plugin's own error came from: the cause's traceback is kept
        tb = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__, limit=-3))
        return CellResult(**fields, status="failed", error=str(exc), notes=tb)
    if isinstance(exc, SystemExit):
        detail = f"the plugin called sys.exit({exc.code!r}) instead of raising an error"
    else:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    console.print(f"[red]{what} failed: {detail}[/]")
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3))
    return CellResult(**fields, status="failed", error=detail, notes=tb)


def _retune_skipped(config: BenchmarkConfig, why: str) -> dict[str, Any]:
    """A cell's `retune` record when the re-tuning attack is on but did not run: why not."""
    return {} if config.retune is None else {"retune": {"skipped": why}}


def _retuned(
    config: BenchmarkConfig, plan: VictimPlan, state: VictimState, model: torch.nn.Module | None
) -> dict[str, Any]:
    """`asr_retuned` and `retune` of a cell whose model (None: the backdoored one) is ready.

    The attack and the defender's data are restored afresh, so a defense that changed its own
    copies cannot change what the model is re-tuned on. A failure here is marked in the record,
    not raised: the defense's numbers stand without it.
    """
    if config.retune is None:
        return {}
    try:
        dataset = grid_dataset(config, plan.dataset)
        victim = _restore(config, plan, state)
        data = _defense_budget(config, plan, dataset, state, victim.attack)
        outcome = retune_attack(
            victim.model if model is None else model,
            victim.attack,
            dataset,
            data,
            state.poisoned_index,
            config.retune,
            device=resolve_device(config.device),
            seed=plan.seed,
        )
    except (Exception, SystemExit) as exc:
        if isinstance(exc, BdtkError):
            detail = str(exc)
        else:
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return _retune_skipped(config, f"re-tuning failed: {detail}")
    return {"asr_retuned": outcome.scores.asr, "retune": outcome.record()}


def run_cell(config: BenchmarkConfig, plan: VictimPlan, cell: CellPlan, state: VictimState) -> CellResult:
    """Evaluate one cell on the shared backdoored model; a failing defense gives a failed record."""
    with torch_threads(config.threads):
        try:
            return _run_cell(config, plan, cell, state)
        except ValidationError as exc:  # a NaN or out-of-range metric: an error, not a result
            return failed_cell(config, plan, cell, invalid_result(exc))


def invalid_result(exc: ValidationError) -> BdtkError:
    """The error of a cell whose numbers do not make a valid record (a NaN, a rate outside [0, 1])."""
    return BdtkError(f"the cell computed an invalid result ({validation_message(CellResult, exc)})")


def _run_cell(config: BenchmarkConfig, plan: VictimPlan, cell: CellPlan, state: VictimState) -> CellResult:
    fields = _cell_fields(config, plan, cell)
    if cell.clean_reference:
        return _clean_reference(config, plan, cell, state, fields)
    if cell.defense is None:
        return CellResult(
            **fields,
            **state.before.model_dump(),
            seconds=state.train_seconds,
            notes="undefended" + (" (cached)" if state.from_cache else ""),
            **_retuned(config, plan, state, None),
        )
    defense = cell.defense
    device = resolve_device(config.device)
    try:
        dataset = grid_dataset(config, plan.dataset)
        victim = _restore(config, plan, state)
        data = _defense_budget(config, plan, dataset, state, victim.attack)
        purifier = create_purifier(defense, seed=plan.seed, device=device)
        result, cost = run_defense(purifier, victim, data, device)
        check_finite(result.model, f"defense {defense.label!r}")
        attack = victim.attack
        after = attack_scores(result.model, dataset.test, attack.apply_trigger, attack.target_labels, device)
    except (Exception, SystemExit) as exc:  # a broken defense (even one calling sys.exit) fails its cell only
        return failed_cell(config, plan, cell, exc)
    return CellResult(
        **fields,
        **after.model_dump(),
        der=der(state.before, after),
        **cost,
        modified=result.modified,
        detected=result.detected,
        notes=result.notes,
        diagnostics=jsonable(result.diagnostics),
        stage_seconds=result.stage_seconds,
        **_retuned(config, plan, state, result.model),
    )


def _clean_reference(
    config: BenchmarkConfig, plan: VictimPlan, cell: CellPlan, state: VictimState, fields: dict[str, Any]
) -> CellResult:
    """The floor of the plan's trigger: a model of the same setting and seed trained without any
    attack (from the artifact cache when another cell or attack trained it), scored exactly as the
    backdoored model is, on the same triggered test images. Re-tuned too, when that is on: then
    `asr_retuned` is what the re-tuning attack implants in a model that never had a backdoor."""
    device = resolve_device(config.device)
    try:
        dataset = grid_dataset(config, plan.dataset)
        cache = ArtifactCache(Path(config.cache_dir) if config.cache_dir else None)
        with measure(device) as usage:
            model = clean_model(dataset, plan.model, plan.seed, config.training, device, cache)
        check_finite(model, "the clean reference model")
        attack = _restore_attack(config, plan, state)
        scores = attack_scores(model, dataset.test, attack.apply_trigger, attack.target_labels, device)
    except (Exception, SystemExit) as exc:
        return failed_cell(config, plan, cell, exc)
    return CellResult(
        **fields,
        **scores.model_dump(),
        seconds=usage.seconds,
        peak_mb=usage.peak_mb,
        notes="never-backdoored model of the same setting and seed, shown the attack's trigger",
        **_retuned(config, plan, state, model),
    )
