"""`bdtk benchmark`: a grid of datasets × models × attacks × defenses × seeds, or a named suite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..benchmark import run_benchmark
from ..config import BenchmarkConfig, PluginChoice, build_config, check_typed, join_preset, load_config_file
from ..console import console
from ..errors import ConfigError
from ..executors import EXECUTORS, get_executor
from ..output_paths import check_output_file
from ..results import CellResult, write_results
from ..store import ResultStore, StoreError, default_db_path, unsaved_rows_path
from ..suites import available_suites, load_suite
from ..victim_benchmark import RETUNE_NEEDS_POISONED_TRAINING, run_victim_benchmark
from ..victims import read_victim_record
from .common import (
    CacheDirOption,
    DataDirOption,
    DeviceOption,
    DownloadOption,
    SeedsOption,
    SetOption,
    Terminated,
    app,
    parse_value,
    set_once,
    terminate_as_interrupt,
    user_errors,
)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> None:
    """Apply `PLUGIN.FIELD=VALUE` to the attacks/defenses named PLUGIN in a raw config dict.

    `PLUGIN` is a plugin name, which addresses every choice of that plugin with or without a
    preset (`mcldef.epochs=3` sets `mcldef:paper` too), or `NAME:PRESET`, which addresses only
    that choice. The value goes into the choice's explicit config, so it wins over the preset's.
    """
    given: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        plugin, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--set expects PLUGIN.FIELD=VALUE (e.g. finetune.epochs=5), got {item!r}.")
        set_once(given.setdefault(plugin, {}), field, parse_value(raw), item)
        hits = 0
        for section in ("attacks", "defenses"):
            for choice in values.get(section, []):
                if plugin in (choice["name"], join_preset(choice["name"], choice.get("preset"))):
                    choice.setdefault("config", {})[field] = parse_value(raw)
                    hits += 1
        if not hits:
            raise ConfigError(f"--set {item!r}: no attack or defense named {plugin!r} in this run.")


def _choice(value: Any, where: str) -> dict[str, Any]:
    """One attack or defense as a PluginChoice dict; a malformed one (e.g. `mcldef:`) is a ConfigError."""
    return build_config(PluginChoice, value, where).model_dump()


def _choices(names: list[str], option: str) -> list[dict[str, Any]]:
    return [_choice(n, f"{option} {n!r}") for n in names]


def refuse_repeats(given: dict[str, list[Any] | None]) -> None:
    """A flag given the same value twice (`--seed 0 --seed 0`, `-d finetune -d finetune`) would run
    the same cells again and report them as separate rows (and as more seeds of evidence); name the
    flag and the value instead. Plugins compare as written, so `finetune` and `finetune:paper`
    are different choices."""
    for option, values in given.items():
        seen: set[str] = set()
        for value in values or []:
            key = str(value)
            if key in seen:
                raise ConfigError(f"{option} repeats {key!r}; give each one once.")
            seen.add(key)


def interrupted_message(why: str, finished: int, store: ResultStore, out: Path) -> str:
    """What an interrupted run leaves behind: the cells this run finished, and (when the database
    can still be read) how many it holds in all, since it may hold cells of earlier runs too."""
    try:
        held = f"; it holds {len(store)} in all" if store.path.exists() else ""
    except StoreError:
        held = ""
    cells = "cell" if finished == 1 else "cells"
    also = f" (this run's are also in {out})" if finished else ""  # no cell: no results JSON written
    return (
        f"{why}: {finished} {cells} finished in this run, stored in {store.path}{held}{also}; run the "
        "same command again to resume."
    )


def _keep_file_config(chosen: list[dict[str, Any]], from_file: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`-d NAME` picks which plugins run; the settings a config file or suite gives that same
    choice (same name and preset) still apply, rather than being dropped without a word."""
    for choice in chosen:
        for given in from_file:
            if (given["name"], given.get("preset")) == (choice["name"], choice.get("preset")):
                choice["config"] = {**given.get("config", {}), **choice.get("config", {})}
                break
    return chosen


@app.command()
@user_errors
def benchmark(
    attack: Annotated[
        list[str] | None,
        typer.Option("--attack", "-a", help="Attack plugin, NAME or NAME:PRESET (repeatable)"),
    ] = None,
    defense: Annotated[
        list[str] | None,
        typer.Option("--defense", "-d", help="Defense plugin, NAME or NAME:PRESET (repeatable)"),
    ] = None,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", help="Dataset name (repeatable; see `bdtk datasets`)")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Model name (repeatable; see `bdtk models`)")
    ] = None,
    seed: SeedsOption = None,
    train_size: Annotated[
        int | None, typer.Option(help="Seeded, class-stratified subset of the training set (a quick trial)")
    ] = None,
    test_size: Annotated[
        int | None, typer.Option(help="Seeded, class-stratified subset of the test set")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs to train the backdoored model")] = None,
    clean_ratio: Annotated[
        float | None, typer.Option(help="Defender's clean budget (share of train)")
    ] = None,
    retune: Annotated[
        bool | None,
        typer.Option(
            "--retune/--no-retune",
            help="Re-tune every cell's model on a few poisoned samples and report the ASR after it "
            "(post-purification robustness); part of each cell's identity when on",
        ),
    ] = None,
    clean_reference: Annotated[
        bool | None,
        typer.Option(
            "--clean-reference/--no-clean-reference",
            help="Also score a never-backdoored model with each attack's trigger (the `clean-model` "
            "reference row: the floor ASR is read against)",
        ),
    ] = None,
    device: DeviceOption = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch CPU threads per cell, wherever it runs; part of each cell's identity"),
    ] = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    output: Annotated[str | None, typer.Option(help="Results JSON path")] = None,
    cache_dir: CacheDirOption = None,
    config: Annotated[Path | None, typer.Option(help="TOML/JSON file with BenchmarkConfig fields")] = None,
    suite: Annotated[
        str | None,
        typer.Option(help=f"Named suite ({', '.join(available_suites())}) or a suite TOML file"),
    ] = None,
    db: Annotated[
        Path | None, typer.Option(help="Result database (default: $BDTK_DB or the user data dir)")
    ] = None,
    force: Annotated[bool, typer.Option(help="Recompute cells already in the result database")] = False,
    executor: Annotated[str, typer.Option(help=f"Where cells run: {', '.join(EXECUTORS)}")] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Existing Ray cluster (HOST:PORT, ray://…, auto) for --executor ray")
    ] = None,
    set_: SetOption = None,
    victim: Annotated[
        Path | None,
        typer.Option(help="A stored victim (`bdtk import`): run the defenses on it instead of a grid"),
    ] = None,
) -> None:
    """Run a grid: train (or load) backdoored models, run each defense, store every cell.

    Cells already in the result database are skipped, so an interrupted grid resumes.
    With --victim, the defenses run on that stored model instead. Rankings: `bdtk leaderboard`.
    """
    get_executor(executor, ray_address)  # a bad executor or Ray address fails before anything runs
    refuse_repeats(
        {"--attack": attack, "--defense": defense, "--dataset": dataset, "--model": model, "--seed": seed}
    )
    if victim is not None:
        if retune or (config is not None and load_config_file(config).get("retune")):
            raise ConfigError(RETUNE_NEEDS_POISONED_TRAINING)
        grid_only = {
            "--attack": attack,
            "--dataset": dataset,
            "--model": model,
            "--train-size": train_size,
            "--test-size": test_size,
            "--epochs": epochs,
            "--data-dir": data_dir,
            "--download": download,
            "--suite": suite,
            "--executor": executor != "local",
            "--ray-address": ray_address,
            "--clean-reference": clean_reference,
        }
        victim_options(grid_only, config)
    if suite is not None and config:
        raise ConfigError("Give either --suite or --config, not both.")
    values: dict[str, Any] = load_config_file(config) if config else {}
    if config:
        check_typed(BenchmarkConfig, values, str(config))
    if suite is not None:  # `--suite ""` is a mistake to report, not "no suite"
        values = load_suite(suite).benchmark_values()
    values.setdefault("attacks", ["badnets"])
    values.setdefault("defenses", ["finetune"])
    for section in ("attacks", "defenses"):
        if not isinstance(values[section], list):
            raise ConfigError(f"`{section}` must be a list of plugins (NAME, NAME:PRESET or tables).")
        values[section] = [_choice(v, f"{section}[{i}]") for i, v in enumerate(values[section])]
    if attack:
        values["attacks"] = _keep_file_config(_choices(attack, "--attack"), values["attacks"])
    if defense:
        values["defenses"] = _keep_file_config(_choices(defense, "--defense"), values["defenses"])
    for one, many, given in (("dataset", "datasets", dataset), ("model", "models", model)):
        if given:
            values.pop(one, None)
            values.pop(many, None)
            values.update({one: given[0]} if len(given) == 1 else {many: given})
    flags = {
        "seeds": seed,
        "train_size": train_size,
        "test_size": test_size,
        "clean_ratio": clean_ratio,
        "device": device,
        "threads": threads,
        "data_dir": data_dir,
        "output": output,
        "cache_dir": cache_dir,
        "clean_reference": clean_reference,
    }
    values.update({k: v for k, v in flags.items() if v is not None})  # 0 and "" are honoured
    if download:
        values["download"] = True
    if epochs is not None:
        values["training"] = {**values.get("training", {}), "epochs": epochs}
    if retune is not None:  # --retune keeps the settings a file gives it; --no-retune turns it off
        values["retune"] = (values.get("retune") or True) if retune else None
    apply_overrides(values, set_ or [])
    if victim is not None:  # the results JSON then names the victim's data, model and label
        record = read_victim_record(victim)
        values.update(dataset=record["spec"]["name"], model=record["model"], attacks=[record["name"]])
    cfg = build_config(BenchmarkConfig, values, "benchmark")
    out = Path(cfg.output)
    store_path = Path(db).expanduser() if db is not None else default_db_path()
    reads = {"result database": store_path, "store's file of unsaved rows": unsaved_rows_path(store_path)}
    check_output_file(out, "--output", extensions=(".json",), inputs=reads)
    rows: list[CellResult] = []

    def save(row: CellResult) -> None:
        rows.append(row)
        write_results(out, cfg, rows)

    with ResultStore(db) as store, terminate_as_interrupt():
        try:
            if victim is not None:
                grid = run_victim_benchmark(victim, cfg, on_result=save, store=store, force=force)
            else:
                grid = run_benchmark(
                    cfg, on_result=save, store=store, force=force, executor=executor, ray_address=ray_address
                )
        except KeyboardInterrupt as stop:
            why = "Terminated" if isinstance(stop, Terminated) else "Interrupted"
            console.print(f"[yellow]{escape(interrupted_message(why, len(rows), store, out))}[/]")
            raise typer.Exit(143 if isinstance(stop, Terminated) else 130) from None
        write_results(out, cfg, grid)
        console.print(results_table(grid))
        for line in results_notes(grid):
            console.print(line, highlight=False)
        console.print(f"Results stored in {store.path} and written to {out}")
        unsaved = store.unsaved_path.exists()
    failed = [r for r in grid if r.status == "failed"]
    if failed:
        console.print(f"[bold red]{failure_summary(failed, len(grid))}[/]", highlight=False, soft_wrap=True)
    if unsaved:
        console.print(
            f"[bold red]Some cells could not be written to {store.path}; they are kept in "
            f"{store.unsaved_path} and imported by the next run.[/]",
            highlight=False,
        )
    if failed or unsaved:
        raise typer.Exit(1)


#: What a --config file may set for a run on a stored victim; the rest describes a grid.
VICTIM_FIELDS = {"defenses", "seeds", "clean_ratio", "val_fraction", "device", "threads", "output"}


def victim_options(grid_only: dict[str, Any], config: Path | None) -> None:
    """Refuse options that describe how to make a victim (or how a grid runs) when --victim already
    gives one, rather than ignoring them without a word."""
    used = [flag for flag, value in grid_only.items() if value not in (None, False, [], "")]
    if used:
        raise ConfigError(f"{', '.join(used)}: not with --victim (the victim is already made).")
    if config is not None:
        extra = sorted(set(load_config_file(config)) - VICTIM_FIELDS)
        if extra:
            raise ConfigError(
                f"{config} sets {', '.join(extra)}, which do not apply with --victim; "
                f"it may set {', '.join(sorted(VICTIM_FIELDS))}."
            )


def failure_summary(failed: list[CellResult], total: int) -> str:
    """One line: how many cells failed, grouped by cell and first line of the error."""
    groups: dict[str, int] = {}
    for row in failed:
        key = f"{row.defense_label} vs {row.attack_label}: {_clip(row.error_line.rstrip('.'), 160)}"
        groups[key] = groups.get(key, 0) + 1
    parts = [f"{key}" + (f" (×{n})" if n > 1 else "") for key, n in groups.items()]
    shown = "; ".join(parts[:3]) + (f"; and {len(parts) - 3} more" if len(parts) > 3 else "")
    cells = "cell" if total == 1 else "cells"
    return f"{len(failed)} of {total} {cells} failed: {shown}."


def _clip(text: str, limit: int) -> str:
    """`text` cut at a word boundary with '…' when longer than `limit` (the full error is stored)."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _varying(rows: list[CellResult]) -> list[str]:
    return [k for k in ("dataset", "model") if len({getattr(r, k) for r in rows}) > 1]


def results_table(rows: list[CellResult]) -> Table:
    """One row per cell; dataset and model move to the title when the whole run shares them."""
    varying = _varying(rows)
    shared = [str(getattr(rows[0], k)) for k in ("dataset", "model") if k not in varying and rows]
    title = " · ".join(["bdtk benchmark", *shared])
    # no vertical rules and one space between columns: the widest row (input-aware, mcldef:paper,
    # re-tuned) then fits 80 columns whole, where a boxed table cut labels and numbers to "…"
    table = Table(
        title=f"{title}\n(%; BA on all test images, ASR/RA on non-target images)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 0),
    )
    retuned = any(r.retune for r in rows)  # "ASR rt": ASR after the re-tuning attack, when it was on
    columns = (*varying, "attack", "defense", "seed", "BA", "ASR", *(["ASR rt"] if retuned else []), "RA")
    # "+MB": memory the defense added to the process at its peak (RSS on CPU); 0 when it fit in pages
    # the process already held from training, which is common on CPU
    columns = (*columns, "DER", "sec", "+MB")
    for col in columns:
        right = col[0].isupper() or col in ("seed", "sec", "+MB")
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    for r in rows:
        head = [str(getattr(r, k)) for k in varying] + [r.attack_label, r.defense_label, str(r.seed)]
        if r.status == "failed":
            table.add_row(*head, "[red]failed", *[""] * (len(columns) - len(head) - 1))
            continue
        table.add_row(
            *head,
            _pct(r.ba),
            _pct(r.asr),
            *([_pct(r.asr_retuned)] if retuned else []),
            _pct(r.ra),
            "—" if r.der is None else f"{r.der:.3f}",
            "—" if r.seconds is None else f"{r.seconds:.1f}" if r.seconds < 100 else f"{r.seconds:.0f}",
            "—" if r.peak_mb is None else f"{r.peak_mb:.0f}",
        )
    return table


def results_notes(rows: list[CellResult]) -> list[str]:
    """Each cell's notes (or error) on a line of its own: too long for a column of an 80-column table."""
    varying = _varying(rows)
    lines = []
    for r in rows:
        text = f"[red]failed: {escape(r.error or '')}[/]" if r.status == "failed" else escape(r.notes)
        if r.status == "ok" and "skipped" in r.retune:
            text = "; ".join(t for t in (text, f"[yellow]{escape(str(r.retune['skipped']))}[/]") if t)
        if text:
            where = " / ".join(
                [*(str(getattr(r, k)) for k in varying), r.attack_label, r.defense_label, f"seed {r.seed}"]
            )
            lines.append(f"[bold]{escape(where)}[/]: {text}")
    return lines
