"""The benchmark orchestrator: a grid of datasets × models × attacks × seeds × defenses.

Everything is validated before any training starts (cells.py plans the grid as backdoored
models, each shared by its cells: the undefended cell and one per defense). An executor (local
or Ray, see executors.py) runs the plan; each finished cell is handed back at once (and written
to the result store when one is given), so an interrupted run loses at most the cells in flight,
and a re-run skips the cells already stored. A cell that fails is recorded as failed with its
error and the grid carries on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape
from rich.progress import Progress

from .artifacts import ArtifactCache
from .cells import grid_dataset, plan_grid, validate
from .config import BenchmarkConfig
from .console import console, progress
from .data import check_budget_size, small_val_warning
from .executors import get_executor
from .results import CellResult
from .store import ResultStore

# --- the grid ---------------------------------------------------------------------------------

OnResult = Callable[[CellResult], None]


class GridProgress:
    """Overall and per-cell progress bars; the executor reports each start and each finished cell."""

    def __init__(self, bar: Progress, total: int, skipped: int, finish: OnResult) -> None:
        self._bar, self._finish = bar, finish
        self._total, self._done = total, 0
        note = f"{skipped} stored cells skipped" if skipped else ""
        self._overall = bar.add_task("grid", total=total, status=note)
        self._current = bar.add_task("cell", total=None, status="")

    def started(self, text: str) -> None:
        self._bar.update(self._current, description=text)

    def finished(self, row: CellResult) -> None:
        self._finish(row)
        self._done += 1
        if not console.is_terminal and os.environ.get("BDTK_QUIET") != "1":
            # no live bars in a log file (a grid run in the background): one line per cell instead
            console.print(cell_line(row, self._done, self._total), highlight=False, markup=False)
        mark = "[red]failed[/]" if row.status == "failed" else "done"
        self._bar.update(
            self._overall,
            advance=1,
            status=f"{row.defense_label} vs {row.attack_label} seed {row.seed}: {mark}",
        )


def cell_line(row: CellResult, done: int, total: int) -> str:
    """`[done/total] DEFENSE vs ATTACK seed S: BA …, ASR …, … s`, or the failure's first line."""
    head = f"[{done}/{total}] {row.defense_label} vs {row.attack_label} seed {row.seed}"
    if row.status == "failed":
        return f"{head}: failed: {row.error_line}"
    parts = [
        f"{name} {value * 100:.2f}%"
        for name, value in (("BA", row.ba), ("ASR", row.asr))
        if value is not None
    ]
    if row.asr_retuned is not None:
        parts.append(f"ASR retuned {row.asr_retuned * 100:.2f}%")
    if row.seconds is not None:
        parts.append(f"{row.seconds:.0f} s")
    return f"{head}: " + ", ".join(parts)


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
    runner = get_executor(executor, ray_address)
    resolved = validate(config)
    for name in config.grid_datasets:  # missing data is an error now, not a failed cell per model
        dataset = grid_dataset(config, name)
        # so is a budget too small to defend with, before any model trains
        check_budget_size(dataset.spec, len(dataset.train), config.clean_ratio, config.val_fraction)
        warning = small_val_warning(dataset.spec, len(dataset.train), config.clean_ratio, config.val_fraction)
        if warning is not None and any(d.name != "none" for d in config.defenses):
            console.print(f"[yellow]{escape(warning)}[/]", highlight=False)
    plans = plan_grid(config, resolved)
    rows: dict[str, CellResult] = {}
    if store is not None and (recovered := store.import_unsaved()):
        console.print(f"{recovered} cells kept aside by an earlier run were added to {store.path}.")
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
            f"{len(rows)} {'cell' if len(rows) == 1 else 'cells'} already in {store.path if store else ''}; "
            "skipping them (--force reruns)."
        )

    def finish(row: CellResult) -> None:
        if store is not None and (error := store.put_or_keep(row)) is not None:
            console.print(
                f"[red]Could not store {row.defense_label} vs {row.attack_label} seed {row.seed} "
                f"({error}); kept it in {store.unsaved_path}, which the next run imports.[/]",
                highlight=False,
            )
        rows[row.config_hash] = row
        if on_result is not None:
            on_result(row)

    if todo:
        # an unusable cache (BDTK_CACHE_DIR a file, a read-only folder) is one error now, not a
        # failed row per cell, which with --force would replace the stored results of those cells
        ArtifactCache(Path(config.cache_dir) if config.cache_dir else None)
        with progress() as bar:
            runner.run(config, todo, GridProgress(bar, total, len(rows), finish))
    return [rows[c.config_hash] for plan in plans for c in plan.cells if c.config_hash in rows]
