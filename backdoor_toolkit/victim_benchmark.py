"""Defenses on a stored victim (`bdtk benchmark --victim DIR`): cells like the grid's, on a fixed model.

The grid (cells.py, executors.py, benchmark.py) plans victims from attack plugins: it trains or
loads each backdoored model and re-applies the attack's trigger to measure ASR. A stored victim
(victims.py, e.g. imported from BackdoorBench) has neither an attack plugin nor a trigger, only
its model and its backdoored test images, so it takes this short path of its own instead of a
special case in every step of the grid. What a cell means stays the same:

- one row per seed for the undefended model and one per defense, written to the same result store
  as soon as it finishes, skipped on a re-run when already stored (unless `force`);
- the defender's clean budget is `clean_ratio` of the victim's clean training images (never one
  the attacker poisoned), with `val_fraction` held out, drawn with the cell's seed;
- BA on the clean test set, ASR the share of the stored backdoored images classified as their
  target, RA the share kept at their true class (when the source recorded it), DER as usual;
- the config hash covers the victim's content hash, the defense and its resolved config, the seed
  and the setting (clean budget, val split, threads), so a different or edited victim is a
  different cell.

Rows name the victim as their attack (`attack = victim name`, `attack_config` holding the source
and the content hash), so leaderboards show imported victims like attacks, and their setting
records `victim_source` so they never pool with bdtk-trained models.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.markup import escape

from .backdoor import bdtk_version
from .cells import defense_fields, failed_record, invalid_result
from .config import BenchmarkConfig, config_hash
from .console import console, progress
from .data import check_budget_size, small_val_warning
from .errors import ConfigError
from .metrics import Scores, der, measure
from .models import check_capabilities
from .plugins import ResolvedPlugin, create_purifier, resolve_plugin
from .results import SCHEMA_VERSION, CellResult, Provenance, jsonable
from .store import ResultStore
from .training import check_finite, resolve_device, seed_everything, torch_threads
from .victims import Victim, load_victim, read_victim_record

OnResult = Callable[[CellResult], None]

#: Why the re-tuning attack (`retune`) cannot run on a stored victim, as one line.
RETUNE_NEEDS_POISONED_TRAINING = (
    "--retune: not with --victim. The re-tuning attack fine-tunes on the attack's poisoned training "
    "samples, and a stored victim has none: it keeps only their indices, and no trigger to make them "
    "again (BackdoorBench does not store it in the result); its backdoored test images are its ASR set, "
    "so re-tuning on them would measure ASR on the images the model was tuned on."
)


def victim_setting(config: BenchmarkConfig, source: str) -> dict[str, Any]:
    """What every cell on a stored victim shares besides its own fields."""
    return {
        **config.model_dump(include={"clean_ratio", "val_fraction", "threads"}),
        "victim_source": source,
    }


def _base(record: dict[str, Any], seed: int) -> dict[str, Any]:
    """The fields a victim's cells share; `attack_config` carries the victim's content hash."""
    return {
        "dataset": record["spec"]["name"],
        "model": record["model"],
        "attack": record["name"],
        "attack_config": {"victim": record["content_hash"], "source": record["source"].get("tool", "")},
        "seed": seed,
    }


def _defense_fields(defense: ResolvedPlugin | None, for_hash: bool = False) -> dict[str, Any]:
    return {"defense": "none"} if defense is None else defense_fields(defense, for_hash)


def plan_victim_cells(
    record: dict[str, Any], config: BenchmarkConfig, defenses: list[ResolvedPlugin]
) -> list[tuple[int, ResolvedPlugin | None, str]]:
    """(seed, defense or None, config hash) for every cell, undefended first for each seed."""
    setting = victim_setting(config, record["source"].get("tool", ""))
    cells = []
    for seed in config.seeds:
        for defense in (None, *defenses):
            payload = {**_base(record, seed), **_defense_fields(defense, for_hash=True), **setting}
            cells.append((seed, defense, config_hash(payload)))
    return cells


def _provenance(device: torch.device, source: str, defense: ResolvedPlugin | None) -> Provenance:
    return Provenance(
        bdtk=bdtk_version(),
        torch=torch.__version__,
        python=platform.python_version(),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        attack_plugin=f"stored victim ({source})",
        defense_plugin=None
        if defense is None
        else f"{defense.info.source.distribution} {defense.info.source.version}",
        threads=torch.get_num_threads(),
    )


def _scores(scores: Scores) -> dict[str, Any]:
    """BA/ASR/RA for a row; RA is None (not NaN) when the victim has no true classes for it."""
    return {k: None if math.isnan(v) else v for k, v in scores.model_dump().items()}


class _Runner:
    def __init__(self, victim: Victim, record: dict[str, Any], config: BenchmarkConfig) -> None:
        self.victim, self.record, self.config = victim, record, config
        self.device = resolve_device(config.device)
        self.source = str(record["source"].get("tool", ""))
        self._before: Scores | None = None

    def before(self) -> Scores:
        """The undefended scores (the model is fixed, so measured once for every seed)."""
        if self._before is None:
            self._before = self.victim.scores(self.victim.model, self.device)
        return self._before

    def fields(self, seed: int, defense: ResolvedPlugin | None, cell_hash: str) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            **_base(self.record, seed),
            **_defense_fields(defense),
            "config_hash": cell_hash,
            "provenance": _provenance(self.device, self.source, defense),
            "setting": victim_setting(self.config, self.source),
        }

    def run(self, seed: int, defense: ResolvedPlugin | None, cell_hash: str) -> CellResult:
        try:
            return self._run(seed, defense, cell_hash)
        except ValidationError as exc:  # a NaN or out-of-range metric: an error, not a result
            what = f"{'none' if defense is None else defense.label} on the victim"
            return failed_record(self.fields(seed, defense, cell_hash), what, invalid_result(exc))

    def _run(self, seed: int, defense: ResolvedPlugin | None, cell_hash: str) -> CellResult:
        with torch_threads(self.config.threads):
            fields = self.fields(seed, defense, cell_hash)
            if defense is None:
                return CellResult(
                    **fields, **_scores(self.before()), notes=f"undefended ({self.source} victim)"
                )
            try:
                before = self.before()
                data = self.victim.defense_data(self.config.clean_ratio, self.config.val_fraction, seed)
                purifier = create_purifier(defense, seed=seed, device=self.device)
                check_capabilities(self.victim.model, purifier.meta.requires, f"Defense {purifier.name!r}")
                model = copy.deepcopy(self.victim.model).to(self.device)
                seed_everything(purifier.seed)
                with measure(self.device) as usage:
                    result = purifier.purify(model, data)
                check_finite(result.model, f"defense {defense.label!r}")
                after = self.victim.scores(result.model, self.device)
            except (Exception, SystemExit) as exc:  # a broken defense fails its cell only
                return _failed(fields, defense, exc)
            return CellResult(
                **fields,
                **_scores(after),
                der=der(before, after),
                seconds=usage.seconds,
                peak_mb=usage.peak_mb,
                modified=result.modified,
                detected=result.detected,
                notes=result.notes,
                diagnostics=jsonable(result.diagnostics),
                stage_seconds=result.stage_seconds,
            )


def _failed(fields: dict[str, Any], defense: ResolvedPlugin, exc: BaseException) -> CellResult:
    return failed_record(fields, f"{defense.label} on the stored victim", exc)


def run_victim_benchmark(
    path: Path,
    config: BenchmarkConfig,
    on_result: OnResult | None = None,
    *,
    store: ResultStore | None = None,
    force: bool = False,
) -> list[CellResult]:
    """Run `config.defenses` (and the undefended cell) on the victim at `path` for each seed.

    Only the defenses, seeds, clean budget, val split, device and threads of `config` apply;
    `config.retune` is refused (`RETUNE_NEEDS_POISONED_TRAINING` says why). With
    a `store`, each finished cell is written at once and stored cells are skipped unless `force`;
    `on_result` sees each freshly computed row. Returns every cell's row in order.
    """
    if config.retune is not None:
        raise ConfigError(RETUNE_NEEDS_POISONED_TRAINING)
    record = read_victim_record(path)
    defenses = [resolve_plugin("purifier", c.name, c.preset, c.config) for c in config.defenses]
    for resolved in defenses:  # resolves what a defense's config names (MCLDef's inverters)
        create_purifier(resolved, seed=config.seeds[0])
    resolve_device(config.device)  # a bad device fails before the victim is read
    # verified even when every cell is stored: a victim edited since must not have its old rows shown
    victim = load_victim(path)
    cells = plan_victim_cells(record, config, defenses)
    rows: dict[str, CellResult] = {}
    if store is not None and (recovered := store.import_unsaved()):
        console.print(f"{recovered} cells kept aside by an earlier run were added to {store.path}.")
    if store is not None and not force:
        stored = store.hashes("ok")
        for _, _, cell_hash in cells:
            if cell_hash in stored and (row := store.get(cell_hash)) is not None:
                rows[cell_hash] = row
        if rows:
            console.print(
                f"{len(rows)} {'cell' if len(rows) == 1 else 'cells'} already in {store.path}; "
                "skipping them (--force reruns)."
            )
    todo = [cell for cell in cells if cell[2] not in rows]
    if todo:
        if any(defense is not None for _, defense, _ in todo):
            check_budget_size(victim.spec, len(victim.clean_train), config.clean_ratio, config.val_fraction)
            warning = small_val_warning(
                victim.spec, len(victim.clean_train), config.clean_ratio, config.val_fraction
            )
            if warning is not None:
                console.print(f"[yellow]{escape(warning)}[/]", highlight=False)
        runner = _Runner(victim, record, config)
        with progress() as bar:
            task = bar.add_task(f"victim {record['name']}", total=len(todo), status="")
            for seed, defense, cell_hash in todo:
                label = "none" if defense is None else defense.label
                bar.update(task, status=f"{label} seed {seed}")
                row = runner.run(seed, defense, cell_hash)
                if store is not None and (error := store.put_or_keep(row)) is not None:
                    console.print(
                        f"[red]Could not store {label} seed {seed} ({error}); kept it in "
                        f"{store.unsaved_path}, which the next run imports.[/]",
                        highlight=False,
                    )
                rows[cell_hash] = row
                if on_result is not None:
                    on_result(row)
                bar.update(task, advance=1)
    return [rows[h] for _, _, h in cells if h in rows]
